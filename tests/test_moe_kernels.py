"""MoE decode kernels, run in the MSL CPU emulator, against the pure-MLX path.

Kernels: ``metal/moe_router.metal`` (softmax + top-k + renormalise),
``metal/moe_gate_up.metal`` (gate+up SwiGLU over the selected experts, optionally
the shared expert and its sigmoid gate), ``metal/moe_down.metal`` (weighted down
projection and combine); both expert kernels include ``metal/moe_qdot.metal``.

Coverage: 4/8-bit, groups 32/64/128, float32/bfloat16 activations, 1-4 tokens,
top-k 2/8, 8/256 experts (small hidden sizes), expert ids repeated across tokens.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_map
from mlx_lm.models.switch_layers import SwitchGLU

from mlx_qwenmoe import kernels
from mlx_qwenmoe.model import MLP, SparseMoeBlock
from mlx_qwenmoe.ops import moe
from mlx_qwenmoe.ops.moe import kernel, reference

import metal_emu as me  # on sys.path through tests/conftest.py
from conftest import STRICT_EMU

D, I, IS = 128, 128, 256  # hidden, expert intermediate, shared-expert intermediate (multiples of group 128)


@pytest.fixture(scope="module", autouse=True)
def emulated_metal():
    """Kernels built in this module come from the emulator (strict: a SIMD collective reached
    by part of a SIMD-group is an error); later modules get fresh ones."""
    kernels.build.cache_clear()
    with me.emulate_metal(**STRICT_EMU):
        yield
    kernels.build.cache_clear()


def _float_params_to(module: nn.Module, dtype: mx.Dtype) -> None:
    module.update(tree_map(lambda p: p.astype(dtype) if mx.issubdtype(p.dtype, mx.floating) else p, module.parameters()))


def _quantized(module: nn.Module, bits: int, group_size: int) -> nn.Module:
    nn.quantize(module, group_size=group_size, bits=bits, class_predicate=lambda _p, m: hasattr(m, "to_quantized"))
    return module


def _moe(num_experts: int, bits: int, group_size: int, dtype: mx.Dtype, seed: int):
    """(experts, shared MLP, shared gate) quantized and stored in ``dtype``, plus float32 twins of the same values."""

    def make():
        mx.random.seed(seed)
        experts = _quantized(SwitchGLU(D, I, num_experts), bits, group_size)
        shared = _quantized(MLP(D, IS), bits, group_size)
        gate = nn.QuantizedLinear.from_linear(nn.Linear(D, 1, bias=False), group_size=64, bits=8)
        return experts, shared, gate

    stored, exact = make(), make()
    for m, m32 in zip(stored, exact):
        _float_params_to(m, dtype)
        m32.update(tree_map(lambda p: p.astype(mx.float32) if mx.issubdtype(p.dtype, mx.floating) else p, m.parameters()))
    return stored, exact


def _routing(n: int, top_k: int, num_experts: int, seed: int) -> Tuple[mx.array, mx.array]:
    """Expert ids drawn from a pool that forces repeats across tokens, and router-like weights."""
    rng = np.random.default_rng(seed)
    pool = rng.permutation(num_experts)[: min(num_experts, top_k + 2)]
    inds = np.stack([rng.permutation(pool)[:top_k] for _ in range(n)]).astype(np.uint32)
    w = rng.random((n, top_k)).astype(np.float32) + 0.1
    return mx.array(w / w.sum(-1, keepdims=True)), mx.array(inds)


def _assert_close(y: mx.array, ref: mx.array, rtol: float, atol_frac: float) -> None:
    y32, r32 = np.array(y.astype(mx.float32)), np.array(ref.astype(mx.float32))
    assert not np.isnan(y32).any()
    atol = atol_frac * float(np.abs(r32).max())
    np.testing.assert_allclose(y32, r32, rtol=rtol, atol=atol)


# (tokens, top_k, experts, shared expert fused) per quantization format: together
# they cover every token count, both top-k and both expert counts.
EXPERT_CASES = [(1, 8, 256, True), (4, 2, 8, False), (3, 8, 8, True), (2, 2, 256, False)]
FORMATS = [(bits, gs, dt) for bits in (4, 8) for gs in (32, 64, 128) for dt in (mx.float32, mx.bfloat16)]


@pytest.mark.parametrize("bits,group_size,dtype", FORMATS, ids=lambda v: str(v).replace("mlx.core.", ""))
def test_experts_match_reference(bits: int, group_size: int, dtype: mx.Dtype) -> None:
    for case, (n, top_k, num_experts, with_shared) in enumerate(EXPERT_CASES):
        seed = 10 * bits + group_size + case
        stored, exact = _moe(num_experts, bits, group_size, dtype, seed)
        weights, inds = _routing(n, top_k, num_experts, seed)
        x = mx.random.normal((1, n, D), key=mx.random.key(seed)).astype(dtype)
        shared = stored[1:] if with_shared else (None, None)
        y = kernel.routed_experts(x, inds.reshape(1, n, top_k), weights.reshape(1, n, top_k), stored[0], *shared)
        assert y.shape == x.shape and y.dtype == dtype
        exact_shared = exact[1:] if with_shared else (None, None)
        ref32 = reference.routed_experts(x.astype(mx.float32), inds, weights, exact[0], *exact_shared)
        if dtype == mx.float32:
            _assert_close(y, ref32.reshape(y.shape), rtol=1e-4, atol_frac=1e-5)
        else:
            # The kernel rounds only y to bfloat16, so it is within bfloat16 rounding of the
            # exact result and no further from it than the bfloat16 reference, which rounds
            # every intermediate.
            _assert_close(y, ref32.reshape(y.shape), rtol=2**-8, atol_frac=1e-4)
            ref = reference.routed_experts(x, inds.reshape(1, n, top_k), weights.reshape(1, n, top_k), stored[0], *shared)
            exact_y = np.array(ref32).reshape(y.shape)
            err = np.abs(np.array(y.astype(mx.float32)) - exact_y).max()
            assert err <= np.abs(np.array(ref.astype(mx.float32)) - exact_y).max()


# Each expert kernel on its own, for two formats and the first two EXPERT_CASES.
SINGLE_KERNEL_FORMATS = [(4, 64, mx.bfloat16), (8, 32, mx.float32)]


@pytest.mark.parametrize("bits,group_size,dtype", SINGLE_KERNEL_FORMATS, ids=lambda v: str(v).replace("mlx.core.", ""))
def test_gate_up_kernel_matches_reference(bits: int, group_size: int, dtype: mx.Dtype) -> None:
    for case, (n, top_k, num_experts, with_shared) in enumerate(EXPERT_CASES[:2]):
        seed = 100 + case
        stored, exact = _moe(num_experts, bits, group_size, dtype, seed)
        _, inds = _routing(n, top_k, num_experts, seed)
        x = mx.random.normal((n, D), key=mx.random.key(seed)).astype(dtype)
        h, zgate = kernel.swiglu_hidden(x, inds, stored[0], stored[1:] if with_shared else None)
        x32 = x.astype(mx.float32)
        experts = exact[0]
        ref = nn.silu(experts.gate_proj(x32[:, None, None], inds)) * experts.up_proj(x32[:, None, None], inds)
        ref = ref.reshape(n, top_k * I)
        if with_shared:
            shared, gate = exact[1:]
            ref = mx.concatenate([ref, nn.silu(shared.gate_proj(x32)) * shared.up_proj(x32)], axis=-1)
            _assert_close(zgate, mx.sigmoid(gate(x32)).reshape(n), rtol=1e-5, atol_frac=1e-6)
        else:
            assert zgate is None
        assert h.dtype == mx.float32
        _assert_close(h, ref, rtol=1e-4, atol_frac=1e-5)


@pytest.mark.parametrize("bits,group_size,dtype", SINGLE_KERNEL_FORMATS, ids=lambda v: str(v).replace("mlx.core.", ""))
def test_down_kernel_matches_reference(bits: int, group_size: int, dtype: mx.Dtype) -> None:
    for case, (n, top_k, num_experts, with_shared) in enumerate(EXPERT_CASES[:2]):
        seed = 200 + case
        stored, exact = _moe(num_experts, bits, group_size, dtype, seed)
        weights, inds = _routing(n, top_k, num_experts, seed)
        h = mx.random.normal((n, top_k * I + (IS if with_shared else 0)), key=mx.random.key(seed))
        zgate = mx.random.uniform(shape=(n,), key=mx.random.key(seed + 1)) if with_shared else None
        shared_down = stored[1].down_proj if with_shared else None
        y = kernel.weighted_down(h, inds, weights, stored[0], dtype, shared_down, zgate)
        per_expert = exact[0].down_proj(h[:, : top_k * I].reshape(n, top_k, 1, I), inds).squeeze(-2)
        ref = (per_expert * weights[..., None]).sum(axis=-2)
        if with_shared:
            ref = ref + zgate[:, None] * exact[1].down_proj(h[:, top_k * I:])
        assert y.dtype == dtype
        _assert_close(y, ref, rtol=1e-4 if dtype == mx.float32 else 2**-8, atol_frac=1e-5)


def test_unfusable_shared_expert_added_with_ops() -> None:
    """A shared expert quantized differently from the routed ones is still added, outside the kernels."""
    (experts, _, gate), _ = _moe(8, 4, 64, mx.float32, seed=3)
    shared = _quantized(MLP(D, IS), 8, 64)
    assert not kernel.shared_fusable(experts, shared, gate)
    weights, inds = _routing(2, 2, 8, seed=3)
    x = mx.random.normal((2, D))
    y = kernel.routed_experts(x, inds, weights, experts, shared, gate)
    _assert_close(y, reference.routed_experts(x, inds, weights, experts, shared, gate), rtol=1e-4, atol_frac=1e-5)


def _distinct_logits(n: int, num_experts: int, seed: int) -> mx.array:
    """Logits without ties (exact in bfloat16), so the top-k set is unique."""
    rng = np.random.default_rng(seed)
    vals = (np.arange(num_experts) - num_experts // 2) / (16.0 if num_experts <= 256 else 64.0)
    return mx.array(np.stack([rng.permutation(vals) for _ in range(n)]).astype(np.float32))


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("num_experts,top_k", [(8, 2), (256, 8), (256, 2), (8, 8)])
def test_router_matches_reference(dtype: mx.Dtype, num_experts: int, top_k: int) -> None:
    for n, normalize in ((1, True), (4, False), (3, True)):
        logits = _distinct_logits(n, num_experts, seed=n + top_k).astype(dtype).reshape(1, n, num_experts)
        w, ids = kernel.route(logits, top_k, normalize)
        rw, rids = reference.route(logits, top_k, normalize)
        assert w.dtype == mx.float32 and ids.dtype == mx.uint32 and w.shape == ids.shape == (1, n, top_k)
        w, ids, rw, rids = (np.array(a).reshape(n, top_k) for a in (w, ids, rw, rids))
        order, rorder = np.argsort(ids, -1), np.argsort(rids, -1)
        np.testing.assert_array_equal(np.take_along_axis(ids, order, -1), np.take_along_axis(rids, rorder, -1))
        np.testing.assert_allclose(np.take_along_axis(w, order, -1), np.take_along_axis(rw, rorder, -1), rtol=1e-5, atol=1e-7)
        assert np.all(np.diff(w, axis=-1) <= 0)  # descending


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> dict:
    """Pretend Metal is the device and count which path each entry point takes."""
    calls = {"route": 0, "routed_experts": 0}
    monkeypatch.setattr(kernels, "use_metal", lambda: True)
    for name in calls:
        original = getattr(kernel, name)

        def wrapped(*args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(kernel, name, wrapped)
    return calls


def test_dispatch_uses_kernels_for_decode_only(counted: dict) -> None:
    (experts, shared, gate), _ = _moe(8, 4, 64, mx.float32, seed=5)
    for n, expect in ((moe.MAX_DECODE_TOKENS, 1), (moe.MAX_DECODE_TOKENS + 1, 0)):
        x = mx.random.normal((1, n, D))
        counted.update(route=0, routed_experts=0)
        weights, inds = moe.route(_distinct_logits(n, 8, seed=n).reshape(1, n, 8), 2, True)
        y = moe.routed_experts(x, inds, weights, experts, shared, gate)
        assert counted == {"route": expect, "routed_experts": expect}
        _assert_close(y, reference.routed_experts(x, inds, weights, experts, shared, gate), rtol=1e-4, atol_frac=1e-5)


def test_dispatch_keeps_float_experts_on_ops(counted: dict) -> None:
    experts = SwitchGLU(D, I, 8)
    weights, inds = _routing(1, 2, 8, seed=6)
    moe.routed_experts(mx.random.normal((1, D)), inds, weights, experts)
    assert counted["routed_experts"] == 0


def test_shared_expert_arguments_come_together() -> None:
    (experts, shared, _), _ = _moe(8, 4, 64, mx.float32, seed=7)
    weights, inds = _routing(1, 2, 8, seed=7)
    for fn in (kernel.routed_experts, reference.routed_experts):
        with pytest.raises(ValueError):
            fn(mx.zeros((1, D)), inds, weights, experts, shared, None)


def test_model_block_on_metal_matches_ops(monkeypatch: pytest.MonkeyPatch) -> None:
    """The model's MoE block through the dispatch, and with the shared expert handed to the kernels."""
    args = SimpleNamespace(
        hidden_size=D, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
        moe_intermediate_size=I, shared_expert_intermediate_size=IS,
    )
    mx.random.seed(11)
    block = SparseMoeBlock(args)
    nn.quantize(block, class_predicate=lambda p, m: hasattr(m, "to_quantized") and {"bits": 8 if p.endswith("gate") else 4, "group_size": 64})
    x = mx.random.normal((2, 1, D))
    expected = block(x)
    monkeypatch.setattr(kernels, "use_metal", lambda: True)
    _assert_close(block(x), expected, rtol=1e-4, atol_frac=1e-5)
    assert kernel.shared_fusable(block.switch_mlp, block.shared_expert, block.shared_expert_gate)
    weights, inds = moe.route(block.gate(x), block.top_k, block.norm_topk_prob)
    fused = moe.routed_experts(x, inds, weights, block.switch_mlp, block.shared_expert, block.shared_expert_gate)
    _assert_close(fused, expected, rtol=1e-4, atol_frac=1e-5)
