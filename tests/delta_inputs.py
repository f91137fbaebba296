"""Random inputs for the gated delta rule tests, and float64 numpy oracles for the steps
before the recurrence (decay/beta, q/k L2 norm), shared by the ops and the Metal kernel tests.

The oracles are written from the published formulas, not with the package's helpers, so a
bug in those helpers cannot hide in the inputs of a comparison.
"""

from __future__ import annotations

from typing import Optional, Tuple

import mlx.core as mx
import numpy as np

Inputs = Tuple[mx.array, mx.array, mx.array, mx.array, mx.array, mx.array, mx.array, Optional[mx.array]]
CoreInputs = Tuple[mx.array, mx.array, mx.array, mx.array, mx.array, Optional[mx.array]]


def make_inputs(
    B: int, T: int, Hk: int, Hv: int, Dk: int, Dv: int,
    dtype: mx.Dtype = mx.float32, seed: int = 0, with_state: bool = True,
) -> Inputs:
    """Raw model-side inputs: q, k, v post-conv, a, b, A_log, dt_bias, state."""
    mx.random.seed(seed)
    q = mx.random.normal((B, T, Hk, Dk)).astype(dtype)
    k = mx.random.normal((B, T, Hk, Dk)).astype(dtype)
    v = mx.random.normal((B, T, Hv, Dv)).astype(dtype)
    a = mx.random.normal((B, T, Hv)).astype(dtype)
    b = mx.random.normal((B, T, Hv)).astype(dtype)
    A_log = mx.random.uniform(-1.0, 1.5, (Hv,))
    dt_bias = mx.random.uniform(0.0, 1.0, (Hv,))
    state = mx.random.normal((B, Hv, Dv, Dk)) * 0.3 if with_state else None
    return q, k, v, a, b, A_log, dt_bias, state


def oracle_gates(a: mx.array, b: mx.array, A_log: mx.array, dt_bias: mx.array) -> Tuple[mx.array, mx.array]:
    """g = -exp(A_log) softplus(a + dt_bias) and beta = sigmoid(b), in float64 numpy."""
    a, b, A_log, dt_bias = (np.array(x.astype(mx.float32), dtype=np.float64) for x in (a, b, A_log, dt_bias))
    g = -np.exp(A_log) * np.logaddexp(0.0, a + dt_bias)
    return mx.array(g.astype(np.float32)), mx.array((1 / (1 + np.exp(-b))).astype(np.float32))


def oracle_l2norm(q: mx.array, k: mx.array, eps: float = 1e-6) -> Tuple[mx.array, mx.array]:
    """q / |q| / sqrt(Dk) and k / |k| (eps inside the root), as transformers' l2norm and scale."""
    def unit(x):
        x64 = np.array(x.astype(mx.float32), dtype=np.float64)
        return x64 / np.sqrt((x64 * x64).sum(-1, keepdims=True) + eps)
    return mx.array((unit(q) * q.shape[-1] ** -0.5).astype(np.float32)).astype(q.dtype), mx.array(unit(k).astype(np.float32)).astype(k.dtype)


def core_inputs(*shape: int, **kw) -> CoreInputs:
    """Inputs of the core recurrence: normalised q, k; v; g; beta; state (shape as ``make_inputs``)."""
    q, k, v, a, b, A_log, dt_bias, state = make_inputs(*shape, **kw)
    q, k = oracle_l2norm(q, k)
    g, beta = oracle_gates(a, b, A_log, dt_bias)
    return q, k, v, g, beta, state


def max_abs(x: mx.array, y: mx.array) -> float:
    """Largest absolute difference, in float32."""
    return float(mx.abs(x.astype(mx.float32) - y.astype(mx.float32)).max())
