"""The gated delta rule's ops forms: the chunked WY/UT form against the token-by-token
reference and against transformers' two torch implementations, and the dispatch of
the model-facing ``gated_delta_update``."""

from __future__ import annotations

import ctypes.util
import os
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
import torch
from transformers.models.qwen3_5_moe import modeling_qwen3_5_moe as hf

from mlx_qwenmoe.ops import gated_delta as gd
from mlx_qwenmoe.ops.gated_delta.chunked import gated_delta_chunked
from mlx_qwenmoe.ops.gated_delta.reference import gated_delta_recurrent

from delta_inputs import core_inputs, make_inputs, max_abs, oracle_gates


# T around the chunk of 64 and across several chunks; Hv = 2 Hk.
@pytest.mark.parametrize("T", [1, 5, 63, 64, 65, 130, 300])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunked_equals_recurrent(T, with_state):
    args = core_inputs(2, T, 2, 4, 32, 16, with_state=with_state)
    o, s = gated_delta_chunked(*args)
    ro, rs = gated_delta_recurrent(*args)
    assert o.shape == ro.shape and o.dtype == mx.float32 and s.dtype == mx.float32
    assert max_abs(o, ro) < 1e-4
    assert max_abs(s, rs) < 1e-4


def test_chunked_real_head_dims_and_strong_decay():
    # Dk = Dv = 128 as in the model; large |g| makes e^-gamma overflow if the
    # decay were factored as e^gamma_i * e^-gamma_j.
    q, k, v, g, beta, state = core_inputs(1, 100, 1, 2, 128, 128)
    g = g * 20.0
    o, s = gated_delta_chunked(q, k, v, g, beta, state)
    ro, rs = gated_delta_recurrent(q, k, v, g, beta, state)
    assert not np.isnan(np.array(o)).any()
    assert max_abs(o, ro) < 1e-4 and max_abs(s, rs) < 1e-4


def test_chunked_bfloat16_inputs_keep_float32_state():
    q, k, v, g, beta, state = core_inputs(1, 70, 1, 2, 32, 16, dtype=mx.bfloat16)
    o, s = gated_delta_chunked(q, k, v, g, beta, state)
    ro, rs = gated_delta_recurrent(q, k, v, g, beta, state)
    assert o.dtype == mx.bfloat16 and s.dtype == mx.float32
    assert max_abs(o, ro) <= 1e-2 * float(mx.abs(ro.astype(mx.float32)).max())
    assert max_abs(s, rs) < 1e-4


def _torch(x):
    return torch.from_numpy(np.array(x.astype(mx.float32)))


@pytest.mark.parametrize("T,with_state", [(1, True), (65, False), (150, True)])
def test_update_matches_transformers(T, with_state):
    """Raw q, k (HF normalises in-kernel); HF's state is (B, Hv, Dk, Dv)."""
    q, k, v, a, b, A_log, dt_bias, state = make_inputs(1, T, 2, 4, 32, 16, with_state=with_state)
    g, beta = oracle_gates(a, b, A_log, dt_bias)
    o, s = gd.gated_delta_update(q, k, v, a, b, A_log, dt_bias, state)
    init = None if state is None else _torch(state).transpose(-1, -2).contiguous()
    common = dict(initial_state=init, output_final_state=True, use_qk_l2norm_in_kernel=True)
    targs = [_torch(x) for x in (q, k, v, g, beta)]
    for fn in (hf.torch_recurrent_gated_delta_rule, hf.torch_chunk_gated_delta_rule):
        ho, hs = fn(*targs, **common)
        assert np.abs(np.array(o) - ho.numpy()).max() < 1e-4, fn.__name__
        assert np.abs(np.array(s) - hs.transpose(-1, -2).numpy()).max() < 1e-4, fn.__name__


@pytest.mark.parametrize("T", [1, 65])
def test_update_ops_path_equals_reference(T):
    q, k, v, a, b, A_log, dt_bias, state = make_inputs(2, T, 2, 4, 32, 16)
    o, s = gd.gated_delta_update(q, k, v, a, b, A_log, dt_bias, state)
    ro, rs = gated_delta_recurrent(*core_inputs(2, T, 2, 4, 32, 16))
    assert max_abs(o, ro) < 1e-4 and max_abs(s, rs) < 1e-4
    o0, s0 = gd.gated_delta_update(q, k, v, a, b, A_log, dt_bias)  # state=None means zeros
    assert s0.shape == (2, 4, 16, 32) and s0.dtype == mx.float32 and o0.shape == v.shape


def test_force_ops_env_disables_metal(monkeypatch):
    from mlx_qwenmoe import kernels

    monkeypatch.setattr(mx.metal, "is_available", lambda: True)
    monkeypatch.setattr(mx, "default_device", lambda: mx.gpu)
    assert kernels.use_metal()
    monkeypatch.setenv("MLX_QWENMOE_FORCE_OPS", "1")
    assert not kernels.use_metal()


# The chunked form is only fast on Linux with an optimised BLAS: mlx_qwenmoe._blas.
def test_openblas_preload_skips(monkeypatch, caplog):
    from mlx_qwenmoe import _blas

    caplog.set_level("DEBUG", logger=_blas.__name__)
    assert not _blas.preload_openblas()  # mlx.core is already loaded in this process
    assert "already imported" in caplog.text
    monkeypatch.setenv(_blas.OPT_OUT_ENV, "1")
    assert not _blas.preload_openblas()
    assert "disabled" in caplog.text


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")
def test_openblas_is_loaded_by_package_import():
    if ctypes.util.find_library("openblas") is None:
        pytest.skip("libopenblas not installed")
    code = "import mlx_qwenmoe, mlx.core; print('libopenblas' in open('/proc/self/maps').read())"
    env = {k: v for k, v in os.environ.items() if k != "MLX_QWENMOE_NO_OPENBLAS"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "True"
