"""Progress on long work: bars on stderr when asked for (the CLI asks when stderr is a terminal)."""

from __future__ import annotations

import importlib

from click.testing import CliRunner

from mlx_qwenmoe import generate as generate_text
from mlx_qwenmoe import load
from mlx_qwenmoe.cli import main
from mlx_qwenmoe.convert import convert
from tiny_models import make_checkpoint

generation = importlib.import_module("mlx_qwenmoe.generate")  # the package's ``generate`` is the function


def test_convert_progress_bar_shows_bytes_rate_and_eta(tmp_path, capsys):
    src, _ = make_checkpoint(tmp_path / "src", hidden_size=64, moe_intermediate_size=64)
    convert(src, tmp_path / "out", progress=True)
    err = capsys.readouterr().err
    assert "converting" in err and "100%" in err and "B/s" in err and "<" in err  # done, rate, ETA
    convert(src, tmp_path / "out2")
    assert capsys.readouterr().err == ""


def test_prefill_progress_for_long_prompts_only(monkeypatch, capsys):
    model, tokenizer = load()
    monkeypatch.setattr(generation, "PROGRESS_MIN_TOKENS", 64)
    generate_text(model, tokenizer, [5] * 100, max_tokens=1, prefill_step_size=32, prefill_progress=True)
    assert "prefill" in capsys.readouterr().err
    generate_text(model, tokenizer, [5] * 20, max_tokens=1, prefill_progress=True)
    assert "prefill" not in capsys.readouterr().err


def test_cli_is_quiet_when_stderr_is_not_a_terminal():
    result = CliRunner().invoke(main, ["generate", "--prompt", "hi", "--max-tokens", "2", "--no-chat"])
    assert result.exit_code == 0 and "prefill" not in result.stderr
