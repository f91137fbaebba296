"""The router never emits an out-of-range expert id, whatever the logits hold.

-inf and NaN logits (a broken checkpoint or overflowing activations) must route to
valid ids with weight 0, in the Metal kernel (run in the emulator) and in its ops twin,
because the expert kernels index the weights by these ids without bounds checks.
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest

from mlx_qwenmoe import kernels
from mlx_qwenmoe.ops.moe import kernel, reference

import metal_emu as me  # on sys.path through tests/conftest.py
from conftest import STRICT_EMU

E, K = 64, 8


@pytest.fixture(scope="module", autouse=True)
def emulated_metal():
    kernels.build.cache_clear()
    with me.emulate_metal(**STRICT_EMU):
        yield
    kernels.build.cache_clear()


def _rows() -> np.ndarray:
    """One row per hazard: fewer than K finite logits, all -inf, all NaN, NaN among finite ones."""
    rng = np.random.default_rng(0)
    rows = np.full((4, E), -np.inf, dtype=np.float32)
    rows[0, [5, 40, 63]] = [1.0, 2.0, 0.5]
    rows[2, :] = np.nan
    rows[3, :] = rng.normal(size=E)
    rows[3, ::3] = np.nan
    return rows


@pytest.mark.parametrize("route", [kernel.route, reference.route], ids=["kernel", "ops"])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16], ids=["float32", "bfloat16"])
def test_router_ids_stay_in_range(route, normalize: bool, dtype: mx.Dtype) -> None:
    rows = _rows()
    w, ids = route(mx.array(rows).astype(dtype), K, normalize)
    w, ids = np.array(w), np.array(ids)
    assert ids.dtype == np.uint32 and (ids < E).all()
    for r in range(len(rows)):
        assert len(set(ids[r].tolist())) == K  # K distinct experts
    assert np.isfinite(w).all() and (w >= 0).all()
    finite = np.isfinite(rows)
    # Experts whose logit is -inf or NaN carry no weight.
    bad = ~np.take_along_axis(finite, ids.astype(np.int64), -1)
    assert (w[bad] == 0).all()
    assert (w[1] == 0).all() and (w[2] == 0).all()
    # The finite logits of row 0 are all picked, with softmax weights.
    assert set(ids[0][w[0] > 0].tolist()) == {5, 40, 63}
    p = np.exp(rows[0, [5, 40, 63]] - 2.0)
    expect = p / p.sum()  # renormalised or not: every other expert has exp(-inf) = 0
    np.testing.assert_allclose(np.sort(w[0][w[0] > 0]), np.sort(expect), rtol=1e-2 if dtype == mx.bfloat16 else 1e-6)
    # Row 3: the K largest finite logits, as the ops twin picks them.
    x = np.where(np.isnan(rows[3]), -np.inf, np.array(mx.array(rows[3]).astype(dtype).astype(mx.float32)))
    top = np.sort(x)[-K:]
    assert np.allclose(np.sort(x[ids[3].astype(np.int64)]), top)
    assert math.isclose(float(w[3].sum()), 1.0, rel_tol=1e-5) or not normalize
