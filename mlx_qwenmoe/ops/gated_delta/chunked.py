"""The gated delta rule in chunked WY/UT form, in pure MLX ops.

Inside a chunk of C tokens the recurrence collapses to matmuls plus one unit
lower-triangular inverse (``reference.py`` is the token-by-token definition).
With gamma the in-chunk cumulative log decay and S (Dk, Dv) the state entering
the chunk (each e^(gamma_i - gamma_j) is taken as e^(sum of g over (j, i]), see below):

    A = strict_tril(beta_i k_i.k_j e^(gamma_i - gamma_j));  T = (I + A)^-1
    W = T (beta e^gamma K);  U = T (beta V);  V' = U - W S
    O = (Q e^gamma) S + P V'   with P = tril(Q K^T e^(gamma_i - gamma_j))
    S <- e^(gamma_C) S + (K e^(gamma_C - gamma))^T V'

Everything that does not depend on S is computed for all chunks at once; the
loop over chunks holds the four matmuls that do (W S, (Q e^gamma) S, P V', K^T V'). On the CPU this is fast only with an optimised BLAS
(see ``mlx_qwenmoe._blas``): about 10 GFLOP for 2048 tokens at the model's shapes.
"""

from __future__ import annotations

from typing import Optional, Tuple

import mlx.core as mx

# Tokens per chunk, for this path and the Metal kernels (their template constant C).
# The prep kernel's prefix scan and its split of the inverse over 4 SIMD-groups assume 64.
CHUNK = 64


def _pad_time(x: mx.array, pad: int) -> mx.array:
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[1] = (0, pad)
    return mx.pad(x, widths)


def _split_chunks(x: mx.array, chunk: int, value_heads: int) -> mx.array:
    """(B, N*C, H, ...) -> contiguous (N, B, Hk, n, C, ...), n = value_heads (1 for key heads).

    Chunk-major, so that the sequential loop slices contiguous blocks.
    """
    B, TP, H = x.shape[:3]
    rest = x.shape[3:]
    x = x.reshape(B, TP // chunk, chunk, H // value_heads, value_heads, *rest)
    order = (1, 0, 3, 4, 2) + tuple(range(5, x.ndim))
    return mx.contiguous(x.transpose(order))


def _chunk_terms(q: mx.array, k: mx.array, v: mx.array, g: mx.array, beta: mx.array, chunk: int) -> Tuple[mx.array, ...]:
    """The per-chunk WY/UT terms, for all chunks at once (chunk-major, as ``_split_chunks`` lays them).

    Every decay is a sum of g over its own span, never a difference of two cumulative sums:
    with g = [-1e5, -0.01, ...] a difference of 0.01 would be below one float32 ulp of 1e5.
    gamma (over [0, i]) and tail (gamma_C - gamma_j, over (j, C)) each add terms of one sign.
    """
    gamma = mx.cumsum(g, axis=-1)
    tail = mx.cumsum(g, axis=-1, reverse=True, inclusive=False)
    idx = mx.arange(chunk)
    # seg[i, j] = sum of g over (j, i]: a running sum down each column of the masked g.
    below = idx[:, None] > idx[None, :]
    seg = mx.cumsum(mx.where(below, g[..., :, None], 0.0), axis=-2)
    # Mask before the exp: above the diagonal there is no decay to take.
    decay = mx.exp(mx.where(below | mx.eye(chunk, dtype=mx.bool_), seg, -mx.inf))
    kt = k.swapaxes(-1, -2)
    A = mx.where(mx.eye(chunk, dtype=mx.bool_), 1.0, beta[..., None] * (k @ kt) * decay)
    # LAPACK's trtri runs on the CPU stream only; the matrices are tiny.
    Tb = mx.linalg.tri_inv(A, upper=False, stream=mx.cpu) * beta[..., None, :]
    e_gamma = mx.exp(gamma)[..., None]
    W = (Tb * e_gamma.swapaxes(-1, -2)) @ k
    U = Tb @ v
    Kd_t = (k * mx.exp(tail)[..., None]).swapaxes(-1, -2)
    d_last = mx.exp(gamma[..., -1])[..., None, None]
    return W, U, Kd_t, d_last, q * e_gamma, (q @ kt) * decay


def gated_delta_chunked(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    g: mx.array,
    beta: mx.array,
    state: Optional[mx.array] = None,
    chunk: int = CHUNK,
) -> Tuple[mx.array, mx.array]:
    """Same contract as ``reference.gated_delta_recurrent``.

    q, k: (B, T, Hk, Dk) normalised; v: (B, T, Hv, Dv) with Hv = n * Hk;
    g (log-space decay), beta: (B, T, Hv); state: (B, Hv, Dv, Dk) float32 or None.
    Returns o (B, T, Hv, Dv) in v's dtype and the final state (B, Hv, Dv, Dk) float32.
    """
    B, T, Hk, Dk = k.shape
    Hv, Dv = v.shape[-2:]
    n = Hv // Hk
    N = -(-T // chunk)
    out_dtype = v.dtype

    # Padded tokens have k = v = beta = 0 and g = 0: they leave the state untouched.
    q, k, v, g, beta = (_pad_time(x.astype(mx.float32), N * chunk - T) for x in (q, k, v, g, beta))
    # Key-side tensors stay per key head, (N, B, Hk, 1, C, Dk), and broadcast over
    # the n value heads that share them; value-side ones are (N, B, Hk, n, C, ...).
    q, k = _split_chunks(q, chunk, 1), _split_chunks(k, chunk, 1)
    v, g, beta = (_split_chunks(x, chunk, n) for x in (v, g, beta))

    W, U, Kd_t, d_last, q_decayed, P = _chunk_terms(q, k, v, g, beta, chunk)

    if state is None:
        S = mx.zeros((B, Hk, n, Dk, Dv), dtype=mx.float32)
    else:
        S = state.astype(mx.float32).reshape(B, Hk, n, Dv, Dk).swapaxes(-1, -2)
    outs = []
    for c in range(N):
        v_new = mx.addmm(U[c], W[c], S, alpha=-1.0)
        # (B, Hk, n, C, Dv) -> (B, C, Hk, n, Dv): the stack below then writes o in its final layout
        outs.append(mx.addmm(q_decayed[c] @ S, P[c], v_new).transpose(0, 3, 1, 2, 4))
        S = mx.addmm(d_last[c] * S, Kd_t[c], v_new)

    o = mx.stack(outs, axis=1).reshape(B, N * chunk, Hv, Dv)
    return o[:, :T].astype(out_dtype), S.swapaxes(-1, -2).reshape(B, Hv, Dv, Dk)
