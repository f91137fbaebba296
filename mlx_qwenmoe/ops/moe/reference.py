"""Pure-MLX MoE: the definition the Metal kernels are tested against, and the path off Metal.

mlx-lm's ``SwitchGLU`` already picks the right ``gather_qmm`` form: sorted
indices when there are many (token, expert) pairs (prefill), the plain gather
for a handful (decode).
"""

from __future__ import annotations

from typing import Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.switch_layers import SwitchGLU


def route(logits: mx.array, top_k: int, normalize: bool) -> Tuple[mx.array, mx.array]:
    """Softmax over experts, top-k, optional renormalisation: (weights float32, expert ids uint32).

    NaN logits count as -inf, and experts with -inf logits get weight 0 (all 0 when
    no logit is finite), so a broken row routes to valid ids with no weight.
    """
    logits = logits.astype(mx.float32)
    logits = mx.where(mx.isnan(logits), -mx.inf, logits)
    probs = mx.softmax(logits, axis=-1)
    probs = mx.where(mx.isnan(probs), 0.0, probs)  # rows with no finite logit
    inds = mx.argpartition(probs, kth=-top_k, axis=-1)[..., -top_k:]
    weights = mx.take_along_axis(probs, inds, axis=-1)
    if normalize:
        total = weights.sum(axis=-1, keepdims=True)
        weights = mx.where(total > 0, weights / mx.where(total > 0, total, 1.0), 0.0)
    return weights, inds.astype(mx.uint32)


def routed_experts(
    x: mx.array,
    inds: mx.array,
    weights: mx.array,
    experts: SwitchGLU,
    shared_expert: Optional[nn.Module] = None,
    shared_expert_gate: Optional[nn.Module] = None,
) -> mx.array:
    """sum_j weights[..., j] * expert_{inds[..., j]}(x), for x (..., D).

    With ``shared_expert`` (and its ``shared_expert_gate``), also adds
    ``sigmoid(shared_expert_gate(x)) * shared_expert(x)``.
    """
    check_shared_pair(shared_expert, shared_expert_gate)
    return combine(x, experts(x, inds), weights, shared_expert, shared_expert_gate)


def combine(
    x: mx.array,
    y: mx.array,
    weights: mx.array,
    shared_expert: Optional[nn.Module] = None,
    shared_expert_gate: Optional[nn.Module] = None,
) -> mx.array:
    """The weighted sum over the k expert outputs y (..., k, D), plus the gated shared expert of x."""
    y = (y * weights[..., None].astype(y.dtype)).sum(axis=-2)
    if shared_expert is not None:
        y = y + gated_shared_expert(x, shared_expert, shared_expert_gate)
    return y


def check_shared_pair(shared_expert: Optional[nn.Module], shared_expert_gate: Optional[nn.Module]) -> None:
    if (shared_expert is None) != (shared_expert_gate is None):
        raise ValueError("shared_expert and shared_expert_gate must be given together")


def gated_shared_expert(x: mx.array, shared_expert: nn.Module, shared_expert_gate: nn.Module) -> mx.array:
    """sigmoid(shared_expert_gate(x)) * shared_expert(x)."""
    return mx.sigmoid(shared_expert_gate(x)) * shared_expert(x)
