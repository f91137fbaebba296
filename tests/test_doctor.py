"""``mlx_qwenmoe doctor``: off Metal (this machine) through the real CLI, and its Metal path
with the device choice mocked and the kernels run by the emulator, at small shapes."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from mlx_qwenmoe import doctor, kernels
from mlx_qwenmoe.cli import main
from mlx_qwenmoe.ops import gated_delta

import metal_emu as me  # on sys.path through tests/conftest.py
from conftest import STRICT_EMU

KERNELS = ("moe_router", "moe_gate_up", "moe_down", "gated_delta_decode", "gated_delta_chunk_prep", "gated_delta_chunk_state")


def test_off_metal_runs_emulator_and_syntax_check() -> None:
    r = CliRunner().invoke(main, ["doctor", "--json"])
    assert r.exit_code == 0, r.output[-2000:]
    report = json.loads(r.output)
    assert report["mode"].startswith("no Metal device")
    assert {"mlx", "mlx-lm", "chip", "mlx_qwenmoe"} <= set(report["environment"])
    names = [row["kernel"] for row in report["rows"]]
    for kernel in KERNELS:
        assert f"{kernel} [syntax, a3b-bf16]" in names and f"{kernel} [syntax, tiny-constant]" in names
        assert any(kernel in name and name.endswith("[emulator]") for name in names)
    assert all(row["check"] == "ok" for row in report["rows"]), report["rows"]


def test_metal_path_with_device_mocked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(doctor, "on_metal", lambda: True)
    monkeypatch.setattr(doctor, "environment", lambda: {"chip": "mocked"})
    monkeypatch.setattr(kernels, "use_metal", lambda: True)
    monkeypatch.setattr(gated_delta, "use_metal", lambda: True)
    kernels.reset()
    with me.emulate_metal(**STRICT_EMU):
        report = doctor.run(repeats=1, shapes=doctor.SMALL)
    kernels.reset()
    rows = {row["kernel"]: row for row in report["rows"]}
    assert report["mode"].startswith("Metal")
    assert not doctor.failed(report)
    assert rows["moe_router"]["check"] == rows["moe_gate_up+moe_down"]["check"] == "ok"
    layer = rows["moe layer (gate, router, experts)"]["ms"]
    assert all(layer[p] is not None for p in ("ours", "ops", "mlx-lm"))
    decode = rows["gated_delta_decode (T=1)"]
    assert decode["check"] == "ok" and decode["ms"]["ours"] is not None and decode["ms"]["mlx-lm"] is not None
    assert rows[f"gated_delta_chunk_prep+gated_delta_chunk_state (T={doctor.SMALL.prefill})"]["check"] == "ok"
    text = doctor.format_report(report)
    assert "ours ms" in text and "mlx-lm ms" in text
