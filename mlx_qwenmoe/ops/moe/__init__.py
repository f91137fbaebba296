"""Sparse MoE: routing and the routed-expert SwiGLU, as the model calls them.

The experts are mlx-lm ``SwitchGLU`` modules (float ``SwitchLinear`` or
``QuantizedSwitchLinear``), so checkpoints keep mlx-lm's layout. On Metal, for a
handful of tokens and 4/8-bit affine experts, the kernels in ``kernel.py`` run;
everywhere else the pure-MLX ``reference.py``.
"""

from __future__ import annotations

from typing import Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.switch_layers import SwitchGLU

from ... import kernels
from . import check, kernel, reference

# Beyond a few tokens the sorted gather_qmm of the reference reads each expert
# once for all its tokens, while the kernels read it once per (token, slot).
MAX_DECODE_TOKENS = 4


def _decode_sized(a: mx.array) -> bool:
    return a.size // a.shape[-1] <= MAX_DECODE_TOKENS


def route(logits: mx.array, top_k: int, normalize: bool) -> Tuple[mx.array, mx.array]:
    """Softmax over experts, top-k, optional renormalisation: (weights float32, expert ids uint32)."""
    if (
        kernels.use_metal()
        and _decode_sized(logits)
        and logits.shape[-1] <= kernel.MAX_ROUTER_EXPERTS
        and top_k <= min(kernel.MAX_TOP_K, logits.shape[-1])
        and _router_verified(logits, top_k, normalize)
    ):
        return kernel.route(logits, top_k, normalize)
    return reference.route(logits, top_k, normalize)


def _router_verified(logits: mx.array, top_k: int, normalize: bool) -> bool:
    tokens, num_experts = logits.size // logits.shape[-1], logits.shape[-1]
    return kernels.verified(
        check.ROUTER,
        (tokens, num_experts, top_k, normalize, logits.dtype),
        lambda: check.check_route(check.router_logits(tokens, num_experts, top_k, logits.dtype), top_k, normalize),
    )


def routed_experts(
    x: mx.array,
    inds: mx.array,
    weights: mx.array,
    experts: SwitchGLU,
    shared_expert: Optional[nn.Module] = None,
    shared_expert_gate: Optional[nn.Module] = None,
) -> mx.array:
    """sum_j weights[..., j] * expert_{inds[..., j]}(x), for x (..., D).

    With ``shared_expert`` and ``shared_expert_gate``, also adds
    ``sigmoid(shared_expert_gate(x)) * shared_expert(x)``, fused into the kernels when possible.
    """
    if (
        kernels.use_metal()
        and _decode_sized(x)
        and kernel.experts_supported(experts)
        and _experts_verified(x, inds.shape[-1], experts, shared_expert, shared_expert_gate)
    ):
        return kernel.routed_experts(x, inds, weights, experts, shared_expert, shared_expert_gate)
    return reference.routed_experts(x, inds, weights, experts, shared_expert, shared_expert_gate)


def _experts_verified(
    x: mx.array, top_k: int, experts: SwitchGLU, shared_expert: Optional[nn.Module], shared_expert_gate: Optional[nn.Module]
) -> bool:
    """Checked once per instantiation: formats, dtypes, token count and whether the shared expert is fused."""
    tokens = x.size // x.shape[-1]
    fused = shared_expert is not None and kernel.shared_fusable(experts, shared_expert, shared_expert_gate)
    formats = (kernel.quant_format(experts.gate_proj), kernel.quant_format(experts.down_proj))
    return kernels.verified(
        check.EXPERTS,
        (formats, x.dtype, tokens, top_k, fused),
        lambda: check.check_experts(
            check.sample_input(tokens, x.shape[-1], x.dtype), top_k, experts, shared_expert, shared_expert_gate
        ),
    )
