"""Checks of the MoE kernels against their ops twin: the runtime safety net's and ``doctor``'s.

Each builds a small input of the same instantiation (dtypes, template arguments,
token count) as the call it guards, runs the kernel and the twin, and raises
``KernelCheckError`` when they disagree (MLX raises on its own when a kernel
fails to build).
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.switch_layers import SwitchGLU

from ...errors import KernelCheckError
from ...kernels import assert_close
from . import reference
# Bound here, not looked up on ``kernel`` per call: tests that count the dispatcher's
# kernel calls (by patching ``kernel``) do not count the checks'.
from .kernel import route as kernel_route
from .kernel import routed_experts as kernel_routed_experts

ROUTER = "moe_router"
EXPERTS = "moe_gate_up+moe_down"


def rtol_for(dtype: mx.Dtype) -> float:
    """Kernel-vs-twin tolerance: the twin rounds every intermediate in ``dtype``, the kernel only its output."""
    return 1e-3 if dtype == mx.float32 else 3e-2


def router_logits(tokens: int, num_experts: int, top_k: int, dtype: mx.Dtype, seed: int = 0) -> mx.array:
    """Logits whose top ``top_k`` are distinct and exact in any float dtype, so the pick is unique."""
    rng = np.random.default_rng(seed)
    logits = np.full((tokens, num_experts), -4.0, dtype=np.float32)
    for row in logits:
        row[rng.permutation(num_experts)[: top_k + 1]] = np.arange(top_k + 1) / 4.0
    return mx.array(logits).astype(dtype)


def sample_input(tokens: int, dims: int, dtype: mx.Dtype, seed: int = 0) -> mx.array:
    return mx.random.normal((tokens, dims), key=mx.random.key(seed)).astype(dtype)


def check_route(logits: mx.array, top_k: int, normalize: bool) -> None:
    """The router kernel against ``reference.route`` on ``logits`` (whose top k must be unique)."""
    weights, inds = kernel_route(logits, top_k, normalize)
    ref_w, ref_i = reference.route(logits, top_k, normalize)
    got = np.sort(np.array(inds), axis=-1)
    if not np.array_equal(got, np.sort(np.array(ref_i), axis=-1)):
        raise KernelCheckError(f"{ROUTER} picked experts {got.tolist()}, the ops twin {np.sort(np.array(ref_i), -1).tolist()}")
    assert_close(ROUTER, mx.sort(weights, axis=-1), mx.sort(ref_w, axis=-1), 1e-4)


def check_experts(
    x: mx.array,
    top_k: int,
    experts: SwitchGLU,
    shared_expert: Optional[nn.Module] = None,
    shared_expert_gate: Optional[nn.Module] = None,
) -> None:
    """The expert kernels against ``reference.routed_experts`` for x (n, D), experts 0..top_k-1 with equal weights."""
    n = x.shape[0]
    inds = mx.broadcast_to(mx.arange(top_k, dtype=mx.uint32), (n, top_k))
    weights = mx.full((n, top_k), 1.0 / top_k)
    y = kernel_routed_experts(x, inds, weights, experts, shared_expert, shared_expert_gate)
    ref = reference.routed_experts(x, inds, weights, experts, shared_expert, shared_expert_gate)
    assert_close(EXPERTS, y, ref, rtol_for(x.dtype))
