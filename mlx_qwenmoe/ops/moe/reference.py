"""Sparse MoE: routing and the routed-expert SwiGLU, as the model calls them.

The experts are mlx-lm ``SwitchGLU`` modules (float ``SwitchLinear`` or
``QuantizedSwitchLinear``), so checkpoints keep mlx-lm's layout.
"""

from __future__ import annotations

from typing import Tuple

import mlx.core as mx
from mlx_lm.models.switch_layers import SwitchGLU


def route(logits: mx.array, top_k: int, normalize: bool) -> Tuple[mx.array, mx.array]:
    """Softmax over experts, top-k, optional renormalisation: (weights float32, expert ids uint32)."""
    probs = mx.softmax(logits.astype(mx.float32), axis=-1)
    inds = mx.argpartition(-probs, kth=top_k - 1, axis=-1)[..., :top_k]
    weights = mx.take_along_axis(probs, inds, axis=-1)
    if normalize:
        weights = weights / weights.sum(axis=-1, keepdims=True)
    return weights, inds.astype(mx.uint32)


def routed_experts(x: mx.array, inds: mx.array, weights: mx.array, experts: SwitchGLU) -> mx.array:
    """sum_j weights[..., j] * expert_{inds[..., j]}(x), for x (..., D)."""
    y = experts(x, inds)
    return (y * weights[..., None].astype(y.dtype)).sum(axis=-2)
