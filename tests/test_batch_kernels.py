"""Batched rows with per-row padding through the Metal kernels (run in the MSL emulator) and the
ops paths: a padded token must leave its row's DeltaNet state as it was, and several tokens of
a batch that pick the same experts must each get the routed-expert sum.

Padding reaches the kernels as values, not as a kernel argument: ``gated_delta_update`` gives a
padded token g = 0 and beta = 0 (and, for the fused decode kernel, which computes g and beta
itself, keeps the old state of a padded row), so the kernel sources know nothing of it.
"""

from __future__ import annotations

import metal_emu as me
import mlx.core as mx
import numpy as np
import pytest

from mlx_qwenmoe import kernels
from mlx_qwenmoe.ops import gated_delta as gd
from mlx_qwenmoe.ops.gated_delta.reference import gated_delta_recurrent
from mlx_qwenmoe.ops.moe import kernel as moe_kernel
from mlx_qwenmoe.ops.moe import reference as moe_reference

from test_gated_delta import make_inputs, max_abs
from test_moe_kernels import D, _assert_close, _moe

SMALL = (2, 4, 32, 16)  # Hk, Hv, Dk, Dv
TOL = 2e-5


@pytest.fixture(scope="module", autouse=True)
def emulated_kernels():
    kernels.build.cache_clear()
    with me.emulate_metal(strict=True):
        yield
    kernels.build.cache_clear()


@pytest.fixture(params=["metal", "ops"])
def path(request, monkeypatch):
    monkeypatch.setattr(gd, "use_metal", lambda: request.param == "metal")
    return request.param


def padding_mask(T: int, pads) -> mx.array:
    """Row r is real from left pad l_r to T - right pad r_r (left: prompts aligned at the end;
    right: mlx-lm's batched prompt chunks)."""
    return mx.array([[left <= t < T - right for t in range(T)] for left, right in pads])


def row_reference(q, k, v, a, b, A_log, dt_bias, state, mask):
    """Each row alone, on its real tokens only: (outputs at those tokens, final state)."""
    outs, states = [], []
    for r in range(q.shape[0]):
        real = mx.array(np.flatnonzero(np.array(mask[r])))
        qr, kr = gd.l2_normalize_qk(q[r : r + 1, real], k[r : r + 1, real])
        g, beta = gd.decay_and_beta(a[r : r + 1, real], b[r : r + 1, real], A_log, dt_bias)
        o, s = gated_delta_recurrent(qr, kr, v[r : r + 1, real], g, beta, state[r : r + 1])
        outs.append(o)
        states.append(s)
    return outs, mx.concatenate(states)


@pytest.mark.parametrize("T,pads", [(70, [(0, 0), (5, 0), (0, 9), (69, 0)]), (5, [(0, 0), (2, 0), (0, 3)])])
def test_padded_rows_leave_state_untouched(path, T, pads):
    """T = 70 crosses a 64-token chunk (chunked ops / the two-pass Metal prefill); T = 5 is
    the token-by-token ops block. Row (69, 0) has one real token."""
    args = make_inputs(len(pads), T, *SMALL, seed=1)
    mask = padding_mask(T, pads)
    o, s = gd.gated_delta_update(*args, mask=mask)
    ref_outs, ref_state = row_reference(*args, mask)
    assert max_abs(s, ref_state) <= TOL
    for r, ro in enumerate(ref_outs):
        real = mx.array(np.flatnonzero(np.array(mask[r])))
        assert max_abs(o[r : r + 1, real], ro) <= TOL * max(1.0, float(mx.abs(ro).max()))


def test_fully_padded_row_keeps_its_state_exactly(path):
    """g = 0 and beta = 0 are exact: a row with every token padded ends bit-identical."""
    for T in (1, 5, 70):
        args = make_inputs(2, T, *SMALL, seed=2)
        mask = padding_mask(T, [(0, 0), (T, 0)])
        _, s = gd.gated_delta_update(*args, mask=mask)
        assert mx.array_equal(s[1], args[-1][1]), T


def test_decode_step_with_a_padded_row(path):
    """One token for three rows, the middle one padded (a short prompt's last chunk in
    mlx-lm's batched prefill): the kernel's step for the others, the old state for it."""
    args = make_inputs(3, 1, *SMALL, seed=3)
    mask = mx.array([[True], [False], [True]])
    _, s = gd.gated_delta_update(*args, mask=mask)
    _, ref_state = row_reference(*args, mx.array([[True], [True], [True]]))
    assert mx.array_equal(s[1], args[-1][1])
    assert max_abs(s[0::2], ref_state[0::2]) <= TOL


@pytest.mark.parametrize("B", [2, 4])
def test_routed_experts_for_a_batch_picking_the_same_experts(B):
    """A decode batch (B, 1, D) where every token picks the same experts (different weights
    and, for one, a different order): each token's sum, as the gather reference computes it."""
    stored, exact = _moe(8, 4, 64, mx.float32, seed=5)
    inds = np.tile(np.array([[3, 6]], dtype=np.uint32), (B, 1))
    inds[-1] = inds[-1, ::-1]
    w = np.random.default_rng(5).random((B, 2)).astype(np.float32) + 0.1
    weights = mx.array(w / w.sum(-1, keepdims=True))
    x = mx.random.normal((B, 1, D), key=mx.random.key(5))
    y = moe_kernel.routed_experts(x, mx.array(inds).reshape(B, 1, 2), weights.reshape(B, 1, 2), stored[0], *stored[1:])
    ref = moe_reference.routed_experts(x, mx.array(inds).reshape(B, 1, 2), weights.reshape(B, 1, 2), exact[0], *exact[1:])
    _assert_close(y, ref.reshape(y.shape), rtol=1e-4, atol_frac=1e-5)
