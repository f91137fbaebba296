"""Metal dispatch for the gated delta rule (kernels in ``metal/gated_delta_*.metal``).

Grid, threadgroup, register and memory-traffic notes for each kernel are in
``metal/README.md``. The callers in ``__init__`` decide when these run.
"""

from __future__ import annotations

from typing import Optional, Tuple

import mlx.core as mx

from ...kernels import build, metal_source
from .chunked import CHUNK

# Prefill runs in segments so the float32 scratch (w, qp, u, r: 2 (Dk + Dv)
# floats per token and value head, 128 MiB per 2048 tokens at 32 x 128 x 128)
# stays bounded for long prompts.
SEGMENT = 2048
_THREADS = 128  # 4 SIMD-groups per threadgroup in the chunked kernels
_STATE_BLOCK = 32  # DVT: state columns per threadgroup in the sequential pass


def supports(dk: int, dv: int) -> bool:
    """Head dims the kernels handle (the real model has Dk = Dv = 128).

    The decode step splits Dk over 32 lanes; the chunked kernels use 8x8 tiles,
    state blocks of min(32, Dv) columns, and threadgroup memory that caps Dk at 128.
    """
    return dk % 32 == 0 and dk <= 128 and dv % 8 == 0 and (dv <= _STATE_BLOCK or dv % _STATE_BLOCK == 0)


def _state_or_zeros(B: int, Hv: int, Dv: int, Dk: int, state: Optional[mx.array]) -> mx.array:
    return mx.zeros((B, Hv, Dv, Dk), dtype=mx.float32) if state is None else state.astype(mx.float32)


def decode_step(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    a: mx.array,
    b: mx.array,
    A_log: mx.array,
    dt_bias: mx.array,
    state: Optional[mx.array] = None,
) -> Tuple[mx.array, mx.array]:
    """One token, fused with the q/k L2 norm and the decay/beta computation.

    Same contract as ``gated_delta_update`` with T == 1.
    """
    B, _, Hk, Dk = q.shape
    Hv, Dv = v.shape[-2:]
    state = _state_or_zeros(B, Hv, Dv, Dk, state)
    kernel = build(
        "gated_delta_decode",
        ("q", "k", "v", "a", "b", "A_log", "dt_bias", "state_in"),
        ("y", "state_out"),
    )
    y, state = kernel(
        inputs=[q, k, v, a, b, A_log, dt_bias, state],
        template=[("InT", v.dtype), ("Dk", Dk), ("Dv", Dv), ("Hk", Hk), ("Hv", Hv)],
        grid=(32, Dv, B * Hv),
        threadgroup=(32, min(4, Dv), 1),
        output_shapes=[v.shape, state.shape],
        output_dtypes=[v.dtype, mx.float32],
    )
    return y, state


def _chunked_segment(
    q: mx.array, k: mx.array, v: mx.array, g: mx.array, beta: mx.array, state: mx.array
) -> Tuple[mx.array, mx.array]:
    B, T, Hk, Dk = k.shape
    Hv, Dv = v.shape[-2:]
    Tp = -(-T // CHUNK) * CHUNK
    header = metal_source("gated_delta_tiles")
    # C: the chunk length, the one in chunked.py, so both paths cut the sequence alike.
    dims = [("C", CHUNK), ("Dk", Dk), ("Dv", Dv), ("Hk", Hk), ("Hv", Hv)]
    prep = build(
        "gated_delta_chunk_prep",
        ("q", "k", "v", "g", "beta", "T"),
        ("w", "u", "qp", "r", "kdec", "cdec"),
        header,
    )
    w, u, qp, r, kdec, cdec = prep(
        inputs=[q, k, v, g, beta, T],
        template=dims,
        grid=(_THREADS, Tp // CHUNK, B * Hv),
        threadgroup=(_THREADS, 1, 1),
        output_shapes=[
            (B * Hv, Tp, Dk), (B * Hv, Tp, Dv), (B * Hv, Tp, Dk), (B * Hv, Tp, Dv), (B * Hv, Tp), (B * Hv, Tp // CHUNK)
        ],
        output_dtypes=[mx.float32] * 6,
    )
    dvt = min(_STATE_BLOCK, Dv)
    walk = build(
        "gated_delta_chunk_state",
        ("w", "qp", "u", "r", "kdec", "cdec", "k", "state_in", "T"),
        ("y", "state_out"),
        header,
    )
    y, state = walk(
        inputs=[w, qp, u, r, kdec, cdec, k, state, T],
        template=[("InT", v.dtype), *dims, ("DVT", dvt)],
        grid=(_THREADS, Dv // dvt, B * Hv),
        threadgroup=(_THREADS, 1, 1),
        output_shapes=[v.shape, state.shape],
        output_dtypes=[v.dtype, mx.float32],
    )
    return y, state


def chunked(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    g: mx.array,
    beta: mx.array,
    state: Optional[mx.array] = None,
) -> Tuple[mx.array, mx.array]:
    """Chunked prefill on the matrix units; same contract as ``chunked.gated_delta_chunked``
    (head dims as ``supports`` allows)."""
    B, T, _, Dk = k.shape
    Hv, Dv = v.shape[-2:]
    state = _state_or_zeros(B, Hv, Dv, Dk, state)
    g = g.astype(mx.float32)
    outs = []
    for s in range(0, T, SEGMENT):
        e = min(T, s + SEGMENT)
        y, state = _chunked_segment(q[:, s:e], k[:, s:e], v[:, s:e], g[:, s:e], beta[:, s:e], state)
        outs.append(y)
    return (outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=1)), state
