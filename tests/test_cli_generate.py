"""``mlx_qwenmoe generate``: output, options, and one-line errors (exit code 2)."""

from __future__ import annotations

import shutil

import pytest
from click.testing import CliRunner

import huggingface_hub.constants

import mlx_qwenmoe.api
from mlx_qwenmoe import generate, load
from mlx_qwenmoe.api import chat_prompt
from mlx_qwenmoe.cli import main
from tiny_models import add_mtp, make_checkpoint, make_tokenizer

VOCAB = 300
PROMPT = "hello world, the model"


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    path, _ = make_checkpoint(tmp_path_factory.mktemp("cli_lm"), seed=5, vocab_size=VOCAB)
    make_tokenizer(path, vocab_size=VOCAB)
    return path


@pytest.fixture(scope="session")
def loaded(model_dir):
    return load(str(model_dir))


def run(*args, input=None):
    return CliRunner().invoke(main, ["generate", *args], input=input)


def assert_usage_error(result, *fragments):
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1, result.output
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def test_plain_prompt_streams_text_then_stats(model_dir, loaded):
    result = run("--model", str(model_dir), "--prompt", PROMPT, "--max-tokens", "8", "--no-chat")
    assert result.exit_code == 0, result.output
    assert result.stdout == generate(*loaded, PROMPT, max_tokens=8) + "\n"
    stats = result.stderr.strip().splitlines()
    assert len(stats) == 1 and "tokens/s" in stats[0] and "Peak memory" in stats[0]
    assert "Prompt: " in stats[0] and "Generation: " in stats[0]


def test_prompt_from_stdin(model_dir):
    args = ("--model", str(model_dir), "--max-tokens", "6", "--no-chat")
    from_stdin = run(*args, input=PROMPT)
    assert from_stdin.exit_code == 0, from_stdin.output
    assert from_stdin.stdout == run(*args, "--prompt", PROMPT).stdout
    assert run(*args, "--prompt", "-", input=PROMPT).stdout == from_stdin.stdout


def test_chat_with_system_and_thinking_switch(model_dir, loaded):
    model, tokenizer = loaded
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": PROMPT}]
    for flag, thinking in (("--no-think", False), ("--think", True)):
        result = run("--model", str(model_dir), "--prompt", PROMPT, "--max-tokens", "6", "--system", "be brief", flag)
        assert result.exit_code == 0, result.output
        expected = generate(model, tokenizer, chat_prompt(tokenizer, messages, enable_thinking=thinking), max_tokens=6)
        assert result.stdout == expected + "\n"


def test_stop_string(model_dir):
    args = ("--model", str(model_dir), "--prompt", PROMPT, "--max-tokens", "16", "--no-chat")
    full = run(*args).stdout.rstrip("\n")
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    assert run(*args, "--stop", "never-there", "--stop", stop).stdout == full[: full.find(stop)] + "\n"


def test_seeded_sampling_is_reproducible(model_dir):
    args = ("--model", str(model_dir), "--prompt", PROMPT, "--max-tokens", "8", "--no-chat", "--temp", "1.5")
    args += ("--top-p", "0.9", "--top-k", "40", "--min-p", "0.01", "--repetition-penalty", "1.1")
    first = run(*args, "--seed", "7")
    assert first.exit_code == 0, first.output
    assert run(*args, "--seed", "7").stdout == first.stdout


@pytest.mark.parametrize(
    "args, fragment",
    [
        (("--max-tokens", "-3"), "--max-tokens"),
        (("--max-tokens", "0"), "--max-tokens"),
        (("--temp", "-0.5"), "--temp"),
        (("--top-p", "1.5"), "--top-p"),
        (("--repetition-penalty", "0"), "--repetition-penalty"),
        (("--draft-tokens", "0"), "--draft-tokens"),
        (("--prompt", ""), "empty"),
    ],
)
def test_bad_option_values(model_dir, args, fragment):
    assert_usage_error(run("--model", str(model_dir), "--prompt", "hi", *args), fragment)


def test_unknown_model_path():
    assert_usage_error(run("--model", "/no/such/model", "--prompt", "hi"), "/no/such/model")


def test_options_that_need_chat_or_mtp(model_dir):
    assert_usage_error(run("--model", str(model_dir), "--prompt", "hi", "--no-chat", "--system", "x"), "--chat")
    assert_usage_error(run("--model", str(model_dir), "--prompt", "hi", "--mtp"), "--mtp")


def test_mtp_greedy_output_equals_plain(tmp_path, model_dir):
    """--mtp --draft-tokens reach the speculative loop, which must not change greedy output."""
    mtp_dir = tmp_path / "with_mtp"
    shutil.copytree(model_dir, mtp_dir)
    add_mtp(mtp_dir)
    args = ("--model", str(mtp_dir), "--prompt", PROMPT, "--max-tokens", "10", "--no-chat")
    with_mtp = run(*args, "--mtp", "--draft-tokens", "3")
    assert with_mtp.exit_code == 0, with_mtp.output
    assert with_mtp.stdout == run(*args).stdout


def test_missing_default_model_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setattr(mlx_qwenmoe.api, "default_model_dir", lambda: tmp_path)
    assert_usage_error(run("--prompt", "hi"), "default model", "config.json")


def test_default_model_is_used_without_model(monkeypatch, model_dir):
    monkeypatch.setattr(mlx_qwenmoe.api, "default_model_dir", lambda: model_dir)
    args = ("--prompt", PROMPT, "--max-tokens", "4", "--no-chat")
    result = run(*args)
    assert result.exit_code == 0, result.output
    assert result.stdout == run("--model", str(model_dir), *args).stdout


@pytest.mark.skipif(
    not (mlx_qwenmoe.api.default_model_dir() / "config.json").is_file(), reason="default model not shipped yet"
)
def test_shipped_default_model_generates():
    result = run("--prompt", "def ", "--max-tokens", "4", "--no-chat")
    assert result.exit_code == 0, result.output
    text, stats = result.output.rsplit("Prompt:", 1)
    assert text.strip()  # the demo model writes something after "def "
    assert "Generation: 4 tokens" in stats


def test_hub_repo_resolves_to_local_snapshot(monkeypatch, tmp_path, model_dir):
    """A repo id found in the HF cache loads offline, from the snapshot directory."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--tiny-org--tiny-lm"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    shutil.copytree(model_dir, snapshot)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))

    assert mlx_qwenmoe.api.resolve("tiny-org/tiny-lm") == snapshot
    args = ("--prompt", PROMPT, "--max-tokens", "4", "--no-chat")
    result = run("--model", "tiny-org/tiny-lm", *args)
    assert result.exit_code == 0, result.output
    assert result.stdout == run("--model", str(model_dir), *args).stdout


def test_unknown_repo_offline_fails_fast(monkeypatch, tmp_path):
    """HF_HUB_OFFLINE=1: an uncached repo id is a one-line error, not a hang."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    assert_usage_error(run("--model", "no-such-org/no-such-model", "--prompt", "hi"), "no-such-org/no-such-model", "HF_HUB_OFFLINE")
