"""The calls that reach every kernel in ``metal/``, at the shapes the syntax check covers.

Each case calls a real wrapper of ``mlx_qwenmoe.ops`` (so the kernels are built and
called exactly as the model does) on lazily created arrays passed as traced
arguments: nothing is allocated or run, even at A3B shapes.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchGLU

from mlx_qwenmoe.doctor import Shapes
from mlx_qwenmoe.ops.gated_delta import kernel as gd_kernel
from mlx_qwenmoe.ops.moe import kernel as moe_kernel


# Qwen3.5-35B-A3B in mlx-community's 4-bit layout (shared-expert gate at 8 bits).
A3B = Shapes("a3b-bf16", mx.bfloat16, 2048, 256, 8, 512, 512, 4, 64, 16, 32, 128, 128, 100)
# The shapes of the kernel tests.
TEST = Shapes("test-f32", mx.float32, 128, 8, 2, 128, 0, 8, 32, 2, 4, 32, 16, 70, tokens=4)
# Inputs of fewer than 8 elements, which MLX passes in the constant address space:
# router logits, ids, weights, the shared gate's scales, zgate, a/b/A_log/dt_bias, g/beta.
TINY = Shapes("tiny-constant", mx.float32, 128, 4, 2, 128, 128, 4, 64, 1, 2, 32, 8, 1)

SHAPES = (A3B, TEST, TINY)


def _qparams(rows: int, cols: int, bits: int, group_size: int, dtype: mx.Dtype, lead: Tuple[int, ...] = ()):
    return [
        mx.zeros((*lead, rows, cols * bits // 32), mx.uint32),
        mx.zeros((*lead, rows, cols // group_size), dtype),
        mx.zeros((*lead, rows, cols // group_size), dtype),
    ]


def _set(layer: nn.Module, params: Sequence[mx.array]) -> None:
    layer.weight, layer.scales, layer.biases = params


def _moe_modules(s: Shapes):
    """Quantized modules of the right formats; their arrays are replaced by traced ones."""

    def switch(bits: int, group_size: int) -> QuantizedSwitchLinear:
        return QuantizedSwitchLinear(group_size, 1, 1, bias=False, group_size=group_size, bits=bits)

    experts = SwitchGLU(s.group_size, 1, 1)
    experts.gate_proj, experts.up_proj, experts.down_proj = (switch(s.bits, s.group_size) for _ in range(3))
    shared = gate = None
    if s.shared_inter:
        shared = nn.Module()
        for name in ("gate_proj", "up_proj", "down_proj"):
            setattr(shared, name, nn.QuantizedLinear(s.group_size, 1, bias=False, group_size=s.group_size, bits=s.bits))
        gate = nn.QuantizedLinear(64, 1, bias=False, group_size=64, bits=8)
    return experts, shared, gate


def _moe_args(s: Shapes) -> List[mx.array]:
    e, d, i, k, n = s.experts, s.hidden, s.inter, s.top_k, s.tokens
    args = [mx.zeros((n, e), s.dtype), mx.zeros((1, n, d), s.dtype), mx.zeros((1, n, k), mx.uint32), mx.zeros((1, n, k))]
    args += _qparams(i, d, s.bits, s.group_size, s.dtype, (e,)) * 2 + _qparams(d, i, s.bits, s.group_size, s.dtype, (e,))
    if s.shared_inter:
        args += _qparams(s.shared_inter, d, s.bits, s.group_size, s.dtype) * 2
        args += _qparams(d, s.shared_inter, s.bits, s.group_size, s.dtype) + _qparams(1, d, 8, 64, s.dtype)
    return args


def _moe_call(s: Shapes) -> Callable[..., List[mx.array]]:
    experts, shared, gate = _moe_modules(s)

    def call(logits, x, inds, weights, *q):
        _set(experts.gate_proj, q[0:3])
        _set(experts.up_proj, q[3:6])
        _set(experts.down_proj, q[6:9])
        if shared is not None:
            _set(shared.gate_proj, q[9:12])
            _set(shared.up_proj, q[12:15])
            _set(shared.down_proj, q[15:18])
            _set(gate, q[18:21])
        routed = moe_kernel.route(logits, s.top_k, True)
        y = moe_kernel.routed_experts(x, inds, weights, experts, shared, gate)
        return [*routed, y]

    return call


def _delta_args(s: Shapes, t: int) -> List[mx.array]:
    return [
        mx.zeros((1, t, s.hk, s.dk), s.dtype), mx.zeros((1, t, s.hk, s.dk), s.dtype),
        mx.zeros((1, t, s.hv, s.dv), s.dtype), mx.zeros((1, t, s.hv), s.dtype), mx.zeros((1, t, s.hv), s.dtype),
        mx.zeros((s.hv,), s.dtype), mx.zeros((s.hv,), s.dtype), mx.zeros((1, s.hv, s.dv, s.dk)),
    ]


def _decode_call(q, k, v, a, b, A_log, dt_bias, state):
    return list(gd_kernel.decode_step(q, k, v, a, b, A_log, dt_bias, state))


def _chunked_call(q, k, v, g, beta, A_log, dt_bias, state):
    return list(gd_kernel.chunked(q, k, v, g.astype(mx.float32), beta.astype(mx.float32), state))


def calls(s: Shapes) -> Dict[str, Tuple[Callable[..., List[mx.array]], List[mx.array]]]:
    """Entry point -> (function, traced arguments) for one shape set; together they build every kernel."""
    return {
        "moe (router, gate_up, down)": (_moe_call(s), _moe_args(s)),
        "gated_delta decode": (_decode_call, _delta_args(s, 1)),
        "gated_delta chunked (prep, state)": (_chunked_call, _delta_args(s, s.prefill)),
    }
