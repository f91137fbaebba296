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
from .reference import check_shared_pair, gated_shared_expert

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


def _header(shared: bool) -> str:
    return (_SHARED_DEFINE if shared else "") + metal_source("moe_qdot")


def _grid(blocks: int, n: int) -> Tuple[int, int, int]:
    simdgroups = _THREADGROUP // _SIMD
    return (_THREADGROUP * -(-blocks // simdgroups), n, 1)


def swiglu_hidden(
    x: mx.array,
    inds: mx.array,
    experts: SwitchGLU,
    shared: Optional[Tuple[nn.Module, nn.Module]] = None,
) -> Tuple[mx.array, Optional[mx.array]]:
    """``moe_gate_up``: silu(gate_e x) * (up_e x) for every selected expert, float32 (n, k * I).

    x (n, D), inds (n, k) uint32. With ``shared`` = (shared expert, its gate), which
    must be ``shared_fusable``, the shared expert's hidden follows as columns
    k * I .. k * I + I_shared, and the second result is sigmoid(gate x) (n,).
    """
    n, top_k = inds.shape
    bits, group_size, scales_dtype = quant_format(experts.gate_proj)
    hidden = experts.gate_proj.output_dims
    names = ["x", "inds", "gw", "gs", "gb", "uw", "us", "ub"]
    inputs = [x, inds, *_qparams(experts.gate_proj), *_qparams(experts.up_proj)]
    template = [("T", x.dtype), ("S", scales_dtype), ("BITS", bits), ("GS", group_size)]
    outputs, shapes, dtypes = ["h"], [(n, top_k * hidden)], [mx.float32]
    blocks = top_k * _blocks(hidden)
    if shared is not None:
        shared_expert, gate = shared
        shared_hidden = shared_expert.gate_proj.weight.shape[0]
        names += ["shg_w", "shg_s", "shg_b", "shu_w", "shu_s", "shu_b", "z_w", "z_s", "z_b"]
        inputs += [*_qparams(shared_expert.gate_proj), *_qparams(shared_expert.up_proj), *_qparams(gate)]
        template += [("ZBITS", gate.bits), ("ZGS", gate.group_size)]
        outputs.append("zgate")
        shapes = [(n, top_k * hidden + shared_hidden), (n,)]
        dtypes.append(mx.float32)
        blocks += _blocks(shared_hidden) + 1  # + one SIMD-group for the shared-expert gate
    outs = build("moe_gate_up", tuple(names), tuple(outputs), _header(shared is not None))(
        inputs=inputs,
        template=template,
        grid=_grid(blocks, n),
        threadgroup=(_THREADGROUP, 1, 1),
        output_shapes=shapes,
        output_dtypes=dtypes,
    )
    return outs[0], (outs[1] if shared is not None else None)


def weighted_down(
    h: mx.array,
    inds: mx.array,
    weights: mx.array,
    experts: SwitchGLU,
    dtype: mx.Dtype,
    shared_down: Optional[nn.Module] = None,
    zgate: Optional[mx.array] = None,
) -> mx.array:
    """``moe_down``: sum_j weights[:, j] * down_{inds[:, j]} h_j (+ zgate * shared_down h_shared), (n, D) in ``dtype``.

    h and zgate as ``swiglu_hidden`` returns them; weights (n, k) float32.
    """
    n = h.shape[0]
    bits, group_size, scales_dtype = quant_format(experts.down_proj)
    dims = experts.down_proj.output_dims
    names = ["h", "inds", "weights", "dw", "ds", "db"]
    inputs = [h, inds, weights, *_qparams(experts.down_proj)]
    if shared_down is not None:
        names += ["shd_w", "shd_s", "shd_b", "zgate"]
        inputs += [*_qparams(shared_down), zgate]
    (y,) = build("moe_down", tuple(names), ("y",), _header(shared_down is not None))(
        inputs=inputs,
        template=[("T", dtype), ("S", scales_dtype), ("BITS", bits), ("GS", group_size)],
        grid=_grid(_blocks(dims), n),
        threadgroup=(_THREADGROUP, 1, 1),
        output_shapes=[(n, dims)],
        output_dtypes=[dtype],
    )
    return y


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
    check_shared_pair(shared_expert, shared_expert_gate)
    fuse = shared_expert is not None and shared_fusable(experts, shared_expert, shared_expert_gate)
    top_k = inds.shape[-1]
    xf = x.reshape(-1, x.shape[-1])
    n = xf.shape[0]
    inds = inds.reshape(n, top_k).astype(mx.uint32)
    h, zgate = swiglu_hidden(xf, inds, experts, (shared_expert, shared_expert_gate) if fuse else None)
    shared_down = shared_expert.down_proj if fuse else None
    y = weighted_down(h, inds, weights.reshape(n, top_k).astype(mx.float32), experts, x.dtype, shared_down, zgate)
    y = y.reshape(x.shape)
    if shared_expert is not None and not fuse:
        y = y + gated_shared_expert(x, shared_expert, shared_expert_gate)
    return y
