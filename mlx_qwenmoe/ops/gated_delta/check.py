"""Checks of the gated-delta kernels against their ops twins: the runtime safety net's and ``doctor``'s.

Inputs are random arrays shaped and typed like the call being guarded (so the
kernel instantiation is the same), with the sequence cut to ``CHECK_T`` tokens.
A disagreement raises ``KernelCheckError``; MLX raises on its own when a kernel
fails to build.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import mlx.core as mx

from ...kernels import assert_close
from .chunked import CHUNK, gated_delta_chunked
# Bound here, not looked up on ``kernel`` per call: tests that count the dispatcher's
# kernel calls (by patching ``kernel``) do not count the checks'.
from .kernel import chunked as kernel_chunked
from .kernel import decode_step as kernel_decode_step
from .reference import gated_delta_recurrent

DECODE = "gated_delta_decode"
CHUNKED = "gated_delta_chunk_prep+gated_delta_chunk_state"
# Two chunks, the second partial: enough to cross a chunk boundary.
CHECK_T = CHUNK + 3


def rtol_for(dtype: mx.Dtype) -> float:
    """The twin rounds q, k and v after normalising in ``dtype``; the kernel keeps them in float32."""
    return 1e-3 if dtype == mx.float32 else 3e-2


def sample_like(arrays: Sequence[Optional[mx.array]], T: int, seed: int = 0) -> List[Optional[mx.array]]:
    """Random (q, k, v, a, b, A_log, dt_bias, state) with the dtypes and shapes of ``arrays``, T tokens.

    A_log keeps the real model's range: per-token decays of about 0.5 to 1.
    """
    q, k, v, a, b, A_log, dt_bias, state = arrays
    keys = mx.random.split(mx.random.key(seed), 8)

    def timed(x: mx.array, key: mx.array) -> mx.array:
        return mx.random.normal((x.shape[0], T, *x.shape[2:]), key=key).astype(x.dtype)

    out = [timed(x, key) for x, key in zip((q, k, v, a, b), keys)]
    out.append(mx.log(mx.random.uniform(1.0, 16.0, A_log.shape, key=keys[5])).astype(A_log.dtype) - 3.0)
    out.append(mx.random.normal(dt_bias.shape, key=keys[6]).astype(dt_bias.dtype))
    out.append(None if state is None else (0.1 * mx.random.normal(state.shape, key=keys[7])).astype(state.dtype))
    return out


def check_decode(q, k, v, a, b, A_log, dt_bias, state) -> None:
    """The decode kernel against the token-by-token twin, one token."""
    from . import decay_and_beta, l2_normalize_qk  # the dispatcher's own ops (this module is imported by it)

    y, s = kernel_decode_step(q, k, v, a, b, A_log, dt_bias, state)
    qn, kn = l2_normalize_qk(q, k)
    g, beta = decay_and_beta(a, b, A_log, dt_bias)
    ref_y, ref_s = gated_delta_recurrent(qn, kn, v, g, beta, state)
    assert_close(f"{DECODE} output", y, ref_y, rtol_for(v.dtype))
    assert_close(f"{DECODE} state", s, ref_s, rtol_for(v.dtype))


def check_chunked(q, k, v, a, b, A_log, dt_bias, state) -> None:
    """The chunked kernels against the chunked ops twin."""
    from . import decay_and_beta, l2_normalize_qk

    qn, kn = l2_normalize_qk(q, k)
    g, beta = decay_and_beta(a, b, A_log, dt_bias)
    y, s = kernel_chunked(qn, kn, v, g, beta, state)
    ref_y, ref_s = gated_delta_chunked(qn, kn, v, g, beta, state)
    assert_close(f"{CHUNKED} output", y, ref_y, rtol_for(v.dtype))
    assert_close(f"{CHUNKED} state", s, ref_s, rtol_for(v.dtype))
