"""The gated delta rule, token by token: the executable definition the fast forms are pinned to.

Per value head h (reading key head h // (Hv // Hk)), with state S of shape (Dv, Dk):
    S <- exp(g_t) S;  u = beta_t (v_t - S k_t);  S <- S + u k_t^T;  o_t = S q_t
"""

from __future__ import annotations

from functools import partial
from typing import Optional, Tuple

import mlx.core as mx


# Compiled as mlx-lm compiles its step: one kernel on Metal for the whole update.
@partial(mx.compile, shapeless=True)
def recurrent_step(
    q: mx.array, k: mx.array, v: mx.array, g: mx.array, beta: mx.array, state: mx.array
) -> Tuple[mx.array, mx.array]:
    """One token. q, k: (B, Hv, Dk); v: (B, Hv, Dv); g, beta: (B, Hv); state: (B, Hv, Dv, Dk) float32."""
    state = state * mx.exp(g)[..., None, None]
    kv_mem = (state * k[..., None, :]).sum(axis=-1)
    u = (v - kv_mem) * beta[..., None]
    state = state + u[..., None] * k[..., None, :]
    o = (state * q[..., None, :]).sum(axis=-1)
    return o, state


def gated_delta_recurrent(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    g: mx.array,
    beta: mx.array,
    state: Optional[mx.array] = None,
) -> Tuple[mx.array, mx.array]:
    """Run the recurrence over T tokens.

    q, k: (B, T, Hk, Dk); v: (B, T, Hv, Dv); g (log-space decay), beta: (B, T, Hv);
    state: (B, Hv, Dv, Dk) or None for zeros. Returns o (B, T, Hv, Dv) in v's dtype
    and the final state in float32.
    """
    B, T, Hk, Dk = k.shape
    Hv, Dv = v.shape[-2:]
    if state is None:
        state = mx.zeros((B, Hv, Dv, Dk), dtype=mx.float32)
    if Hv != Hk:
        q = mx.repeat(q, Hv // Hk, axis=-2)
        k = mx.repeat(k, Hv // Hk, axis=-2)
    out_dtype = v.dtype
    q, k, v = (x.astype(mx.float32) for x in (q, k, v))
    g, beta = g.astype(mx.float32), beta.astype(mx.float32)
    outs = []
    for t in range(T):
        o, state = recurrent_step(q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t], state)
        outs.append(o)
    return mx.stack(outs, axis=1).astype(out_dtype), state
