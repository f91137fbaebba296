"""Streamed experts (``load(..., max_resident=...)``): bit-identical to the resident model at any
budget, slot pools reused under pressure, and a checkpoint changed under a running model is a
one-line error naming the file."""

from __future__ import annotations

import os
import shutil

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

from mlx_qwenmoe.api import default_model_dir, load
from mlx_qwenmoe.cli import main
from mlx_qwenmoe.convert import convert
from mlx_qwenmoe.errors import CheckpointError
from mlx_qwenmoe.expert_stream import BudgetError, expert_bytes, moe_blocks
from tiny_models import make_checkpoint, make_tokenizer

PROMPT = "def read_config(path):\n    with open(path) as f:\n        return json.load(f)\n\ndef main():"
DECODE = 12


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A random 4-bit checkpoint with 32 experts (top-4) over several shards, in mlx-lm's layout."""
    src, _ = make_checkpoint(
        tmp_path_factory.mktemp("stream_src"), seed=3, vocab_size=300, num_experts=32, num_experts_per_tok=4
    )
    out = tmp_path_factory.mktemp("stream") / "q4"
    convert(src, out, bits=4, group_size=32, max_shard_bytes=60_000)
    make_tokenizer(out, vocab_size=300)
    return out


def _full_bytes(model) -> int:
    blocks = moe_blocks(model)
    return sum(expert_bytes(b) * b.switch_mlp.gate_proj.weight.shape[0] for _, b in blocks)


def _greedy(model, ids, steps: int):
    """Prompt logits, then ``steps`` greedy decode steps: (tokens, every logits row)."""
    cache = model.make_cache()
    logits = model(mx.array([ids]), cache=cache)
    rows, tokens = [np.array(logits[0])], []
    for _ in range(steps):
        tokens.append(int(mx.argmax(logits[0, -1]).item()))
        logits = model(mx.array([[tokens[-1]]]), cache=cache)
        rows.append(np.array(logits[0]))
    return tokens, rows


@pytest.mark.parametrize("model_kind", ["bundled", "tiny"])
def test_streamed_outputs_are_bit_identical_at_any_budget(model_kind, tiny_dir):
    path = None if model_kind == "bundled" else str(tiny_dir)
    resident, tokenizer = load(path)
    ids = tokenizer.encode(PROMPT)
    want_tokens, want_rows = _greedy(resident, ids, DECODE)
    full = _full_bytes(resident)
    for fraction in (0.1, 0.5, 1.0):
        budget = max(int(full * fraction), full // 16 + 1)
        model, _ = load(path, max_resident=budget, prefetch_experts=fraction == 0.5)
        tokens, rows = _greedy(model, ids, DECODE)
        assert tokens == want_tokens, fraction
        for got, want in zip(rows, want_rows):
            np.testing.assert_array_equal(got, want)
        stream = model.expert_stream
        assert stream.resident_bytes() <= budget
        assert stream.stats.lookups > 0 and stream.stats.bytes_read > 0
        stream.close()


def test_slots_are_reused_under_pressure_and_hold_the_right_rows(tiny_dir):
    resident, tokenizer = load(str(tiny_dir))
    full = _full_bytes(resident)
    model, _ = load(str(tiny_dir), max_resident=full // 4)
    stream = model.expert_stream
    allocated = [id(b.switch_mlp.gate_proj.weight) for _, b in moe_blocks(model)]
    _greedy(model, tokenizer.encode(PROMPT), DECODE)
    assert stream.stats.experts_read > len(stream.layers) * stream.num_slots  # evictions happened
    assert [id(b.switch_mlp.gate_proj.weight) for _, b in moe_blocks(model)] == allocated  # updated in place
    by_name = dict(moe_blocks(resident))
    for (prefix, block), slots in zip(moe_blocks(model), stream.layers):
        assert block.switch_mlp.gate_proj.weight.shape[0] == slots.num_slots == stream.num_slots
        held = np.nonzero(slots.map.expert_at >= 0)[0]
        assert held.size == slots.num_slots
        for name in ("weight", "scales", "biases"):
            pool = np.array(getattr(block.switch_mlp.down_proj, name))
            full_rows = np.array(getattr(by_name[prefix].switch_mlp.down_proj, name))
            np.testing.assert_array_equal(pool[held], full_rows[slots.map.expert_at[held]])
    stream.close()


@pytest.mark.parametrize("damage", ["truncate", "modify"])
def test_checkpoint_changed_mid_generation_is_a_one_line_error(tmp_path, damage):
    model_dir = tmp_path / "model"
    shutil.copytree(default_model_dir(), model_dir)
    resident, tokenizer = load(model_dir)
    model, _ = load(model_dir, max_resident=_full_bytes(resident) // 8)
    cache = model.make_cache()
    mx.eval(model(mx.array([tokenizer.encode(PROMPT)]), cache=cache))
    weights = model_dir / "model.safetensors"
    if damage == "truncate":
        os.truncate(weights, weights.stat().st_size // 2)
    else:
        with open(weights, "r+b") as f:
            f.seek(-4096, os.SEEK_END)
            f.write(b"\xff" * 4096)
        st = weights.stat()
        os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    with pytest.raises(CheckpointError) as err:
        for _ in range(DECODE):
            mx.eval(model(mx.array([[1]]), cache=cache))
    message = str(err.value)
    assert "\n" not in message and str(weights) in message
    assert ("truncated" if damage == "truncate" else "modified") in message
    model.expert_stream.close()


def test_budget_below_one_expert_per_layer_names_the_option(tiny_dir):
    with pytest.raises(BudgetError, match="max_resident"):
        load(str(tiny_dir), max_resident=1000)
    result = CliRunner().invoke(
        main, ["generate", "--model", str(tiny_dir), "--prompt", "hi", "--no-chat", "--max-resident", "1KB"]
    )
    assert result.exit_code == 2 and "--max-resident" in result.output, result.output


def test_serve_and_chat_take_max_resident():
    """``serve`` names the flag for a budget below one expert per layer (the server test runs one
    streaming its experts); ``chat`` with a quarter of the bundled model's experts says what it says resident."""
    refused = CliRunner().invoke(main, ["serve", "--max-resident", "1KB"])
    assert refused.exit_code == 2 and "--max-resident" in refused.output, refused.output
    args = ["chat", "--temp", "0", "--max-tokens", "6"]
    plain = CliRunner().invoke(main, args, input="def add(a, b):\n")
    streamed = CliRunner().invoke(main, [*args, "--max-resident", "1MB"], input="def add(a, b):\n")
    assert plain.exit_code == 0 and streamed.exit_code == 0, streamed.output
    assert streamed.stdout == plain.stdout and plain.stdout.strip()


def test_cli_verbose_prints_stream_stats(tiny_dir):
    args = ["generate", "--model", str(tiny_dir), "--prompt", "hello", "--no-chat", "--max-tokens", "4"]
    plain = CliRunner().invoke(main, args)
    streamed = CliRunner().invoke(main, [*args, "--max-resident", "200KB", "--prefetch-experts", "--verbose"])
    assert streamed.exit_code == 0, streamed.output
    assert streamed.stdout == plain.stdout
    assert "hit rate" in streamed.stderr and "read per token" in streamed.stderr and "prefetch accuracy" in streamed.stderr


def test_float_checkpoint_without_stacked_experts_is_refused(tmp_path):
    src, _ = make_checkpoint(tmp_path / "hf", seed=1, vocab_size=300)
    make_tokenizer(src, vocab_size=300)
    with pytest.raises(CheckpointError, match="switch_mlp"):
        load(str(src), max_resident=10**9)
