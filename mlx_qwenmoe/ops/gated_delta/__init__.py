"""Gated delta rule: the model-facing entry point and its dispatch.

``reference.py`` is the token-by-token definition; faster forms live beside it and
are pinned to it by tests: ``chunked.py`` (WY/UT chunked form in MLX ops) and
``kernel.py`` (Metal: a fused one-token step and a two-pass chunked prefill).
One token takes the recurrent step, more take the chunked form; Metal when
``kernels.use_metal()`` and the head dims suit the kernels, ops otherwise.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn

from ... import kernels
from ...kernels import use_metal
from . import check, kernel
from .chunked import gated_delta_chunked
from .reference import gated_delta_recurrent


# Blocks this short (decode, speculative verify) are cheaper token by token than padded to a
# 64-token chunk: on the CPU the crossover is 6-8 tokens at both tiny and A3B head shapes.
RECURRENT_MAX_T = 6


@partial(mx.compile, shapeless=True)
def decay_and_beta(
    a: mx.array, b: mx.array, A_log: mx.array, dt_bias: mx.array
) -> Tuple[mx.array, mx.array]:
    """g = -exp(A_log) * softplus(a + dt_bias) (log-space, float32) and beta = sigmoid(b)."""
    g = -mx.exp(A_log.astype(mx.float32)) * nn.softplus(a.astype(mx.float32) + dt_bias.astype(mx.float32))
    return g, mx.sigmoid(b.astype(mx.float32))


def l2_normalize_qk(q: mx.array, k: mx.array, eps: float = 1e-6) -> Tuple[mx.array, mx.array]:
    """L2-normalise q and k over the head dim (eps added to sum of squares) and scale q by Dk^-0.5."""
    dk = q.shape[-1]
    inv = dk**-0.5
    # rms_norm divides by sqrt(mean(x^2) + eps'), so eps' = eps / Dk matches x / sqrt(sum(x^2) + eps).
    q = (inv * inv) * mx.fast.rms_norm(q, None, eps * inv * inv)
    k = inv * mx.fast.rms_norm(k, None, eps * inv * inv)
    return q, k


def gated_delta_update(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    a: mx.array,
    b: mx.array,
    A_log: mx.array,
    dt_bias: mx.array,
    state: Optional[mx.array] = None,
    mask: Optional[mx.array] = None,
) -> Tuple[mx.array, mx.array]:
    """The whole DeltaNet token mixer after the convolution.

    q, k: (B, T, Hk, Dk) raw (after conv + silu); v: (B, T, Hv, Dv); a, b: (B, T, Hv);
    state: (B, Hv, Dv, Dk) float32 or None. Returns o (B, T, Hv, Dv) and the new state.
    mask: (B, T) bool or None; a False token (batch padding) leaves the state exactly as it
    was (its output is garbage): it gets decay g = 0 and beta = 0, so every form of the
    rule (recurrent, chunked, Metal) skips it without knowing about padding.
    """
    T = q.shape[1]
    metal = use_metal() and kernel.supports(q.shape[-1], v.shape[-1])
    args = (q, k, v, a, b, A_log, dt_bias, state)
    if metal and T == 1 and _verified(check.DECODE, check.check_decode, args, 1):
        o, new_state = kernel.decode_step(*args)
        if mask is not None:
            old = mx.zeros_like(new_state) if state is None else state
            new_state = mx.where(mask[:, :, None, None], new_state, old)
        return o, new_state
    chunked_kernel = metal and T > 1 and _verified(check.CHUNKED, check.check_chunked, args, min(T, check.CHECK_T))
    q, k = l2_normalize_qk(q, k)
    g, beta = decay_and_beta(a, b, A_log, dt_bias)
    if mask is not None:
        g, beta = mx.where(mask[..., None], g, 0.0), mx.where(mask[..., None], beta, 0.0)
    if chunked_kernel:
        return kernel.chunked(q, k, v, g, beta, state)
    if T <= RECURRENT_MAX_T:
        return gated_delta_recurrent(q, k, v, g, beta, state)
    return gated_delta_chunked(q, k, v, g, beta, state)


def _verified(name: str, check_fn: Callable[..., None], args: tuple, check_t: int) -> bool:
    """Kernel ``name`` passed ``check_fn`` on a ``check_t``-token sample shaped like ``args``.

    One check per instantiation: shapes other than time, dtypes, and whether a and b
    are small enough (under 8 elements) for MLX to pass them as ``constant``.
    """
    a = args[3]
    timed = [(x.shape[:1] + x.shape[2:], x.dtype) for x in args[:5]]
    rest = [None if x is None else (x.shape, x.dtype) for x in args[5:]]
    variant = (*timed, *rest, a.shape[0] * check_t * a.shape[2] < 8)
    return kernels.verified(name, variant, lambda: check_fn(*check.sample_like(args, check_t)))


def gated_delta_steps(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    a: mx.array,
    b: mx.array,
    A_log: mx.array,
    dt_bias: mx.array,
    state: Optional[mx.array] = None,
    mask: Optional[mx.array] = None,
) -> Tuple[mx.array, List[Optional[mx.array]]]:
    """``gated_delta_update`` one token at a time, exactly as decoding runs it, returning the
    state before the block and after every token (a speculative verify block is cut back to
    any prefix of itself this way)."""
    outs, states = [], [state]
    for t in range(q.shape[1]):
        step = slice(t, t + 1)
        o, state = gated_delta_update(
            q[:, step], k[:, step], v[:, step], a[:, step], b[:, step], A_log, dt_bias, state,
            None if mask is None else mask[:, step],
        )
        outs.append(o)
        states.append(state)
    return mx.concatenate(outs, axis=1), states
