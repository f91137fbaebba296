"""Metal wrappers for the decode-sized MoE kernels (``metal/moe_*.metal``).

Three dispatches replace mlx-lm's router ops, three ``gather_qmm`` calls, the
SwiGLU and the weighted combine (and, fused, the shared expert): the router, the
gate+up SwiGLU over the selected experts, and the weighted down projection. The
expert weights are read in mlx-lm's ``QuantizedSwitchLinear`` layout.
"""

from __future__ import annotations

from typing import Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.switch_layers import SwiGLU, SwitchGLU

from ...kernels import build, metal_source

SUPPORTED_BITS = (4, 8)
SUPPORTED_GROUP_SIZES = (32, 64, 128)
MAX_ROUTER_EXPERTS = 1024
MAX_TOP_K = 32
_SIMD = 32
_THREADGROUP = 64  # two SIMD-groups, as MLX's qmv
_ROWS_PER_SIMDGROUP = 4  # NR in the kernels
_SHARED_DEFINE = "#define MOE_SHARED 1\n"


def quant_format(layer: nn.Module) -> Optional[Tuple[int, int, mx.Dtype]]:
    """(bits, group_size, scales dtype) of an affine-quantized linear the kernels read, else None."""
    if getattr(layer, "mode", None) != "affine" or getattr(layer, "biases", None) is None:
        return None
    if "bias" in layer or getattr(layer, "global_scale", None) is not None:
        return None
    if layer.bits not in SUPPORTED_BITS or layer.group_size not in SUPPORTED_GROUP_SIZES:
        return None
    return layer.bits, layer.group_size, layer.scales.dtype


def experts_supported(experts: SwitchGLU) -> bool:
    """True when gate/up share one supported format and down has a supported one, all with one scales dtype."""
    gate, up, down = (quant_format(experts.gate_proj), quant_format(experts.up_proj), quant_format(experts.down_proj))
    if gate is None or down is None or gate != up:
        return False
    return gate[2] == down[2] and isinstance(experts.activation, SwiGLU)


def shared_fusable(experts: SwitchGLU, shared_expert: nn.Module, shared_expert_gate: nn.Module) -> bool:
    """True when the shared expert is quantized like the routed experts, so the kernels can carry it."""
    gate_fmt, down_fmt = quant_format(experts.gate_proj), quant_format(experts.down_proj)
    z = quant_format(shared_expert_gate)
    return (
        quant_format(shared_expert.gate_proj) == gate_fmt
        and quant_format(shared_expert.up_proj) == gate_fmt
        and quant_format(shared_expert.down_proj) == down_fmt
        and z is not None
        and z[2] == gate_fmt[2]
        and shared_expert_gate.weight.shape[0] == 1
    )


def route(logits: mx.array, top_k: int, normalize: bool) -> Tuple[mx.array, mx.array]:
    """Softmax, top-k and renormalisation in one kernel; same contract as ``reference.route``.

    The k entries come in descending weight order (the reference leaves them unordered).
    """
    lead, num_experts = logits.shape[:-1], logits.shape[-1]
    flat = logits.reshape(-1, num_experts)
    n = flat.shape[0]
    kern = build("moe_router", ("logits",), ("weights", "inds"))
    weights, inds = kern(
        inputs=[flat],
        template=[("T", flat.dtype), ("E", num_experts), ("K", top_k), ("NORM", bool(normalize))],
        grid=(_SIMD, n, 1),
        threadgroup=(_SIMD, 1, 1),
        output_shapes=[(n, top_k), (n, top_k)],
        output_dtypes=[mx.float32, mx.uint32],
    )
    return weights.reshape(*lead, top_k), inds.reshape(*lead, top_k)


def _qparams(layer: nn.Module) -> list:
    return [layer.weight, layer.scales, layer.biases]


def _blocks(rows: int) -> int:
    return -(-rows // _ROWS_PER_SIMDGROUP)


def _grid(blocks: int, n: int) -> Tuple[int, int, int]:
    simdgroups = _THREADGROUP // _SIMD
    return (_THREADGROUP * -(-blocks // simdgroups), n, 1)


def routed_experts(
    x: mx.array,
    inds: mx.array,
    weights: mx.array,
    experts: SwitchGLU,
    shared_expert: Optional[nn.Module] = None,
    shared_expert_gate: Optional[nn.Module] = None,
) -> mx.array:
    """Same contract as ``reference.routed_experts``, for ``experts_supported`` experts.

    The shared expert rides in the two kernels when ``shared_fusable``; otherwise
    it is added with ordinary ops.
    """
    if (shared_expert is None) != (shared_expert_gate is None):
        raise ValueError("shared_expert and shared_expert_gate must be given together")
    fuse = shared_expert is not None and shared_fusable(experts, shared_expert, shared_expert_gate)
    dims, top_k = x.shape[-1], inds.shape[-1]
    xf = x.reshape(-1, dims)
    n = xf.shape[0]
    inds = inds.reshape(n, top_k).astype(mx.uint32)
    weights = weights.reshape(n, top_k).astype(mx.float32)
    bits, group_size, scales_dtype = quant_format(experts.gate_proj)
    down_bits, down_group, _ = quant_format(experts.down_proj)
    hidden = experts.gate_proj.output_dims
    header = metal_source("moe_qdot")

    up_names = ["x", "inds", "gw", "gs", "gb", "uw", "us", "ub"]
    up_inputs = [xf, inds, *_qparams(experts.gate_proj), *_qparams(experts.up_proj)]
    up_template = [("T", x.dtype), ("S", scales_dtype), ("BITS", bits), ("GS", group_size)]
    up_outputs, up_dtypes = ["h"], [mx.float32]
    blocks = top_k * _blocks(hidden)
    h_width = top_k * hidden
    if fuse:
        shared_hidden = shared_expert.gate_proj.weight.shape[0]
        up_names += ["shg_w", "shg_s", "shg_b", "shu_w", "shu_s", "shu_b", "z_w", "z_s", "z_b"]
        up_inputs += [*_qparams(shared_expert.gate_proj), *_qparams(shared_expert.up_proj), *_qparams(shared_expert_gate)]
        up_template += [("ZBITS", shared_expert_gate.bits), ("ZGS", shared_expert_gate.group_size)]
        up_outputs.append("zgate")
        up_dtypes.append(mx.float32)
        blocks += _blocks(shared_hidden) + 1  # + the shared-expert gate
        h_width += shared_hidden
    up_shapes = [(n, h_width)] + ([(n,)] if fuse else [])
    prefix = _SHARED_DEFINE if fuse else ""
    outs = build("moe_gate_up", tuple(up_names), tuple(up_outputs), prefix + header)(
        inputs=up_inputs,
        template=up_template,
        grid=_grid(blocks, n),
        threadgroup=(_THREADGROUP, 1, 1),
        output_shapes=up_shapes,
        output_dtypes=up_dtypes,
    )

    down_names = ["h", "inds", "weights", "dw", "ds", "db"]
    down_inputs = [outs[0], inds, weights, *_qparams(experts.down_proj)]
    if fuse:
        down_names += ["shd_w", "shd_s", "shd_b", "zgate"]
        down_inputs += [*_qparams(shared_expert.down_proj), outs[1]]
    (y,) = build("moe_down", tuple(down_names), ("y",), prefix + header)(
        inputs=down_inputs,
        template=[("T", x.dtype), ("S", scales_dtype), ("BITS", down_bits), ("GS", down_group)],
        grid=_grid(_blocks(dims), n),
        threadgroup=(_THREADGROUP, 1, 1),
        output_shapes=[(n, dims)],
        output_dtypes=[x.dtype],
    )
    y = y.reshape(x.shape)
    if shared_expert is not None and not fuse:
        y = y + mx.sigmoid(shared_expert_gate(x)) * shared_expert(x)
    return y
