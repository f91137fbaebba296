"""The runtime safety net: a kernel that fails to build or computes wrong values is
reported once and replaced by its ops twin, and generation stays correct.

The bundled demo model (quantized experts, DeltaNet heads the kernels take) runs with
Metal pretended and every kernel executed by the MSL emulator, as the kernel tests do.
"""

from __future__ import annotations

import logging
from typing import Iterator

import mlx.core as mx
import pytest

from mlx_qwenmoe import generate, kernels, load
from mlx_qwenmoe.ops import gated_delta, moe
from mlx_qwenmoe.ops.gated_delta import kernel as gd_kernel
from mlx_qwenmoe.ops.moe import kernel as moe_kernel

import metal_emu as me  # on sys.path through tests/conftest.py
from conftest import STRICT_EMU

PROMPT = "def read_config(path):"
TOKENS = 3
ALL_CHECKS = {"moe_router", "moe_gate_up+moe_down", "gated_delta_decode", "gated_delta_chunk_prep+gated_delta_chunk_state"}


@pytest.fixture(scope="module")
def demo():
    return load()


@pytest.fixture(scope="module")
def expected(demo) -> str:
    kernels.reset()
    return generate(*demo, PROMPT, max_tokens=TOKENS)


@pytest.fixture
def metal(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Metal pretended, kernels from the emulator, check results forgotten before and after."""
    kernels.reset()
    monkeypatch.setattr(kernels, "use_metal", lambda: True)
    monkeypatch.setattr(gated_delta, "use_metal", lambda: True)
    caplog.set_level(logging.WARNING, logger="mlx_qwenmoe")
    with me.emulate_metal(**STRICT_EMU):
        yield
    kernels.reset()


def _warnings(caplog: pytest.LogCaptureFixture) -> list:
    return [r.getMessage() for r in caplog.records if r.name == "mlx_qwenmoe" and r.levelno >= logging.WARNING]


def test_healthy_kernels_run_and_match(demo, expected: str, metal, caplog, monkeypatch) -> None:
    launched = []
    original = me.EmulatedKernel.__call__
    monkeypatch.setattr(me.EmulatedKernel, "__call__", lambda self, **kw: launched.append(self.name) or original(self, **kw))
    assert generate(*demo, PROMPT, max_tokens=TOKENS) == expected
    assert _warnings(caplog) == [] and kernels.failed_kernels() == {}
    assert {"moe_router", "moe_gate_up", "moe_down", "gated_delta_decode", "gated_delta_chunk_prep"} <= set(launched)


def _break_source(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    original = kernels.metal_source
    monkeypatch.setattr(kernels, "metal_source", lambda n: original(n) + ("\nnot_msl(;\n" if n == name else ""))


def _corrupt_outputs(monkeypatch: pytest.MonkeyPatch, module, name: str) -> None:
    """Kernel ``name`` still runs (in the emulator) but its first output is doubled."""
    original = module.build

    def build(kernel_name: str, *args):
        kern = original(kernel_name, *args)
        if kernel_name != name:
            return kern

        def wrong(**kw):
            outs = kern(**kw)
            return [2 * outs[0], *outs[1:]]

        return wrong

    monkeypatch.setattr(module, "build", build)


HOOKS = {
    "moe_router fails to build": (lambda mp: _break_source(mp, "moe_router"), "moe_router"),
    "gated_delta_decode computes wrong values": (
        lambda mp: _corrupt_outputs(mp, gd_kernel, "gated_delta_decode"), "gated_delta_decode"),
    "moe_gate_up computes wrong values": (
        lambda mp: _corrupt_outputs(mp, moe_kernel, "moe_gate_up"), "moe_gate_up+moe_down"),
}


@pytest.mark.parametrize("hook", HOOKS)
def test_bad_kernel_falls_back_with_one_warning(demo, expected: str, metal, caplog, monkeypatch, hook: str) -> None:
    install, culprit = HOOKS[hook]
    install(monkeypatch)
    assert generate(*demo, PROMPT, max_tokens=TOKENS) == expected
    warnings = _warnings(caplog)
    assert len(warnings) == 1 and culprit in warnings[0], warnings
    assert set(kernels.failed_kernels()) == {culprit}
    # Later calls take the ops path without checking or warning again.
    assert generate(*demo, PROMPT, max_tokens=2) == expected[: len(generate(*demo, PROMPT, max_tokens=2))]
    assert len(_warnings(caplog)) == 1


def test_check_failure_reason_is_named(metal, monkeypatch) -> None:
    """The warning carries the reason: here the disagreement, with its size."""
    _corrupt_outputs(monkeypatch, moe_kernel, "moe_router")
    moe.route(mx.random.normal((1, 1, 16), key=mx.random.key(1)), 4, True)
    assert "differs from the ops twin" in kernels.failed_kernels()["moe_router"]
