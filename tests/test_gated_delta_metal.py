"""The gated-delta Metal kernels, run on the CPU in the MSL emulator (tests/metal_emu)
against the ops reference.

Kernels: metal/gated_delta_decode.metal (one fused token), metal/gated_delta_chunk_prep.metal
and metal/gated_delta_chunk_state.metal (the two prefill passes), with
metal/gated_delta_tiles.metal as their header.

Tolerances: the kernels keep the state and all arithmetic in float32, so against a
float32 reference fed the same (bfloat16-rounded where the inputs are bfloat16)
values the state agrees to 2e-5 and the output to 2e-5 (float32) or one bfloat16
rounding of the output, 1e-2 of its largest magnitude (bfloat16).
"""

from __future__ import annotations

import metal_emu as me
import mlx.core as mx
import pytest

from mlx_qwenmoe import kernels
from mlx_qwenmoe.ops import gated_delta as gd
from mlx_qwenmoe.ops.gated_delta import kernel
from mlx_qwenmoe.ops.gated_delta.reference import gated_delta_recurrent

from conftest import STRICT_EMU
from delta_inputs import make_inputs, max_abs

SMALL = (2, 4, 32, 16)  # Hk, Hv, Dk, Dv
REAL = (1, 2, 128, 128)  # the model's head dims, fewer heads
DTYPES = [mx.float32, mx.bfloat16]
STATE_TOL = 2e-5


@pytest.fixture(scope="module", autouse=True)
def emulated_kernels():
    """Build the package's kernels with the emulator standing in for mx.fast.metal_kernel
    (strict, on a shuffled schedule)."""
    kernels.build.cache_clear()
    with me.emulate_metal(**STRICT_EMU):
        yield
    kernels.build.cache_clear()


def f32(x):
    return None if x is None else x.astype(mx.float32)


def check(o, s, ro, rs, dtype):
    assert o.dtype == dtype and s.dtype == mx.float32 and o.shape == ro.shape
    scale = float(mx.abs(ro).max())
    y_tol = 2e-5 * max(1.0, scale) if dtype == mx.float32 else 1e-2 * scale
    assert max_abs(o, ro) <= y_tol
    assert max_abs(s, rs) <= STATE_TOL


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,heads,with_state", [(1, SMALL, False), (2, SMALL, True), (2, REAL, True)])
def test_decode_kernel(dtype, B, heads, with_state):
    args = make_inputs(B, 1, *heads, dtype=dtype, with_state=with_state)
    o, s = kernel.decode_step(*args)
    # reference in float32 on the same values: the kernel normalises q, k in float32
    ro, rs = gd.gated_delta_update(*(f32(x) for x in args))
    check(o, s, ro, rs, dtype)


def chunked_case(B, T, heads, dtype, with_state, decay_scale=1.0):
    q, k, v, a, b, A_log, dt_bias, state = make_inputs(B, T, *heads, dtype=dtype, with_state=with_state)
    q, k = gd.l2_normalize_qk(q, k)
    g, beta = gd.decay_and_beta(a, b, A_log, dt_bias)
    g = g * decay_scale
    o, s = kernel.chunked(q, k, v, g, beta, state)
    ro, rs = gated_delta_recurrent(f32(q), f32(k), f32(v), g, beta, state)
    check(o, s, ro, rs, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [1, 63, 64, 65, 300])
@pytest.mark.parametrize("B,with_state", [(1, False), (2, True)])
def test_chunked_kernels(dtype, T, B, with_state):
    chunked_case(B, T, SMALL, dtype, with_state)


@pytest.mark.parametrize("dtype", DTYPES)
def test_chunked_kernels_real_head_dims(dtype):
    chunked_case(1, 65, REAL, dtype, True)


def test_chunked_kernels_strong_decay():
    # e^(gamma_i - gamma_j) above the diagonal would overflow if computed before masking
    chunked_case(1, 65, SMALL, mx.float32, True, decay_scale=30.0)


def test_chunked_kernels_segment_boundary(monkeypatch):
    monkeypatch.setattr(kernel, "SEGMENT", 128)
    chunked_case(1, 300, SMALL, mx.float32, True)


@pytest.mark.parametrize("T", [1, 65])
def test_update_dispatches_to_metal(monkeypatch, T):
    calls = []
    for name in ("decode_step", "chunked"):
        fn = getattr(kernel, name)
        monkeypatch.setattr(kernel, name, lambda *a, _fn=fn, _n=name: calls.append(_n) or _fn(*a))
    monkeypatch.setattr(gd, "use_metal", lambda: True)
    args = make_inputs(1, T, *SMALL)
    o, s = gd.gated_delta_update(*args)
    assert calls == ["decode_step" if T == 1 else "chunked"]
    monkeypatch.setattr(gd, "use_metal", lambda: False)
    ro, rs = gd.gated_delta_update(*args)
    check(o, s, ro, rs, mx.float32)


def test_prep_kernel_needs_its_device_barrier(monkeypatch):
    """w and u go through device memory between SIMD-groups of the prep kernel: the strict
    emulator rejects the kernel if that barrier orders threadgroup memory only."""
    source = kernels.metal_source
    flags = "threadgroup_barrier(mem_flags::mem_device | mem_flags::mem_threadgroup);"
    assert flags in source("gated_delta_chunk_prep")

    def weakened(name):
        return source(name).replace(flags, "threadgroup_barrier(mem_flags::mem_threadgroup);")

    monkeypatch.setattr(kernels, "metal_source", weakened)
    kernels.build.cache_clear()
    with pytest.raises(me.MetalEmuError, match="output '[wu]', written by simdgroup .* no threadgroup_barrier"):
        chunked_case(1, 65, SMALL, mx.float32, False)
    kernels.build.cache_clear()
