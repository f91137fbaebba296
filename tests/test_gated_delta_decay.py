"""The chunked gated delta rule at extreme decay: a very strong decay and weak ones in the
same 64-token chunk (issue 12). Both chunked forms, the ops path (``chunked.py``) and the
Metal prefill kernels (run in the MSL emulator, strict, shuffled), must match a token-by-token
float64 oracle written here from the definition, to 1e-5 relative in float32.

Before the fix both forms took in-chunk decays as differences of float32 cumulative sums of g,
which cancel: with g = [-1e5, -0.01 x 63] a difference of 0.01 is below one ulp of 1e5.
"""

from __future__ import annotations

import metal_emu as me
import mlx.core as mx
import numpy as np
import pytest

from mlx_qwenmoe import kernels
from mlx_qwenmoe.ops.gated_delta import kernel
from mlx_qwenmoe.ops.gated_delta.chunked import gated_delta_chunked

from conftest import STRICT_EMU

HK, HV, D = 1, 2, 32
STRONG = [-30.0, -300.0, -1e3, -1e4, -1e5]
REL_TOL = 1e-5


@pytest.fixture(scope="module")
def emulated_kernels():
    kernels.build.cache_clear()
    with me.emulate_metal(**STRICT_EMU):
        yield
    kernels.build.cache_clear()


def oracle(q, k, v, g, beta, state):
    """Token by token in float64: S <- e^g S; S <- S + beta (v - S k) k^T; o = S q."""
    B, T, Hk, _ = q.shape
    Hv = v.shape[2]
    S = state.astype(np.float64).copy()
    o = np.zeros(v.shape, np.float64)
    for t in range(T):
        for h in range(Hv):
            kt, qt = k[:, t, h * Hk // Hv].astype(np.float64), q[:, t, h * Hk // Hv].astype(np.float64)
            S[:, h] *= np.exp(g[:, t, h].astype(np.float64))[:, None, None]
            err = v[:, t, h] - np.einsum("bvk,bk->bv", S[:, h], kt)
            S[:, h] += (beta[:, t, h, None] * err)[:, :, None] * kt[:, None, :]
            o[:, t, h] = np.einsum("bvk,bk->bv", S[:, h], qt)
    return o, S


def decay_case(g0: float, T: int, with_state: bool, strong_at=(0,), seed: int = 0):
    """Float32 inputs: unit-norm q, k; g = g0 at the positions in ``strong_at``, weak decay
    (-0.01 .. -0.001) elsewhere."""
    rng = np.random.default_rng(seed)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    q = unit(rng.standard_normal((1, T, HK, D))).astype(np.float32)
    k = unit(rng.standard_normal((1, T, HK, D))).astype(np.float32)
    v = rng.standard_normal((1, T, HV, D)).astype(np.float32)
    g = rng.uniform(-0.01, -0.001, (1, T, HV)).astype(np.float32)
    g[:, list(strong_at)] = g0
    beta = rng.uniform(0.1, 0.9, (1, T, HV)).astype(np.float32)
    state = (rng.standard_normal((1, HV, D, D)) * 0.3).astype(np.float32) if with_state else np.zeros((1, HV, D, D), np.float32)
    return q, k, v, g, beta, state


def rel_errors(fn, case):
    """Largest |error| of o and of the final state, each over the largest |oracle value|."""
    ro, rs = oracle(*case)
    o, s = fn(*(mx.array(x) for x in case))
    o, s = np.array(o, dtype=np.float64), np.array(s, dtype=np.float64)
    return float(np.abs(o - ro).max() / np.abs(ro).max()), float(np.abs(s - rs).max() / np.abs(rs).max())


CASES = [(g0, T, with_state) for g0 in STRONG for T in (64, 130) for with_state in (False, True)]


@pytest.mark.parametrize("g0,T,with_state", CASES)
def test_ops_chunked_exact_at_extreme_decay(g0, T, with_state):
    strong_at = (0,) if T == 64 else (0, 101)  # and one in mid-chunk
    eo, es = rel_errors(gated_delta_chunked, decay_case(g0, T, with_state, strong_at))
    assert eo <= REL_TOL and es <= REL_TOL, (eo, es)


@pytest.mark.parametrize("g0,T,with_state", CASES)
def test_metal_chunked_exact_at_extreme_decay(emulated_kernels, g0, T, with_state):
    strong_at = (0,) if T == 64 else (0, 101)
    eo, es = rel_errors(kernel.chunked, decay_case(g0, T, with_state, strong_at))
    assert eo <= REL_TOL and es <= REL_TOL, (eo, es)



# Issue 12's own cases: g = [g0, weak x 63], T = 64 (errors before the fix: 2.0e-4, 6.5e-4, 6.3e-2, 3.2e-2).
ISSUE_CASES = [(-300.0, -0.001, False), (-1e3, -0.001, False), (-1e5, -0.01, True), (-1e5, -0.001, False)]


@pytest.mark.parametrize("g0,weak,with_state", ISSUE_CASES)
def test_issue_cases_both_forms(emulated_kernels, g0, weak, with_state):
    case = decay_case(g0, 64, with_state)
    case[3][...] = weak
    case[3][:, 0] = g0
    for fn in (gated_delta_chunked, kernel.chunked):
        eo, es = rel_errors(fn, case)
        assert eo <= REL_TOL and es <= REL_TOL, (fn.__name__, eo, es)
