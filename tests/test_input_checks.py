"""Bad input to the model, ``generate`` and ``mlx_qwenmoe generate``: a clean one-line error,
never a segfault, a C++ exception or silently wrong output; interrupts exit 130 quietly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import warnings

import mlx.core as mx
import pytest
from click.testing import CliRunner

from mlx_qwenmoe import generate, load, stream_generate
from mlx_qwenmoe.cli import main

VOCAB = 4096  # the bundled demo model's


@pytest.fixture(scope="module")
def bundled():
    return load()


def _usage_error(args, input=None) -> str:
    result = CliRunner().invoke(main, ["generate", *args], input=input)
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    return errors[0]


@pytest.mark.parametrize("ids, message", [
    ([[5, 6, 100000]], "token id 100000 is outside the vocabulary (0..4095)"),
    ([[5, 6, VOCAB]], "token id 4096 is outside the vocabulary (0..4095)"),
    ([[5, -1]], "token id -1 is outside the vocabulary (0..4095)"),
])
def test_model_call_checks_token_ids(bundled, ids, message):
    model, _ = bundled
    with pytest.raises(ValueError) as info:
        model(mx.array(ids))
    assert str(info.value) == message


def test_model_call_on_empty_input(bundled):
    model, _ = bundled
    with pytest.raises(ValueError, match=r"token ids must not be empty \(shape \(1, 0\)\)"):
        model(mx.zeros((1, 0), dtype=mx.int32))
    with pytest.raises(ValueError, match="integer mx.array"):
        model(mx.array([]))


@pytest.mark.parametrize("prompt, message", [
    ([5, 6, 100000], "token id 100000 is outside the vocabulary (0..4095)"),
    ([5, 6, VOCAB + 1000], "token id 5096 is outside the vocabulary (0..4095)"),
    ([5, 6, -1], "token id -1 is outside the vocabulary"),
    ([5, 6, 2**40], "token id 1099511627776 is outside the vocabulary"),
    ([5, 6.5], "prompt must be text or a sequence of integer token ids"),
    (mx.array([5, 100000]), "token id 100000 is outside the vocabulary (0..4095)"),
])
def test_generate_checks_token_ids(bundled, prompt, message):
    model, tokenizer = bundled
    for run in (lambda: generate(model, tokenizer, prompt, max_tokens=2),
                lambda: next(stream_generate(model, tokenizer, prompt, max_tokens=2))):
        with pytest.raises(ValueError) as info:
            run()
        assert str(info.value) == message


def test_load_refuses_a_non_float_dtype():
    with pytest.raises(ValueError, match=r"dtype mlx.core.int32: expected mx.float16, mx.bfloat16 or mx.float32"):
        load(dtype=mx.int32)


def test_prompt_past_max_position_embeddings_warns(bundled):
    model, tokenizer = bundled
    with pytest.warns(UserWarning, match=r"plus max_tokens \(4090\) run past the model's max_position_embeddings \(4096\)"):
        next(stream_generate(model, tokenizer, [5] * 10, max_tokens=4090))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        generate(model, tokenizer, [5] * 10, max_tokens=2)


@pytest.mark.parametrize("args, fragment", [
    (("--temp", "nan"), "--temp"),
    (("--temp", "inf"), "is not a finite number"),
    (("--min-p", "nan"), "--min-p"),
    (("--top-p", "nan"), "--top-p"),
    (("--repetition-penalty", "inf"), "--repetition-penalty"),
    (("--seed", "-1"), "--seed"),
    (("--seed", str(2**64)), "--seed"),
    (("--fit", "24GB"), "No such option"),
])
def test_non_finite_or_out_of_range_options(args, fragment):
    assert fragment in _usage_error(["--prompt", "hi", *args])


def test_top_k_at_or_past_the_vocabulary_keeps_all():
    plain = CliRunner().invoke(main, ["generate", "--prompt", "hi", "--max-tokens", "4", "--no-chat"])
    for k in (str(VOCAB), str(VOCAB * 10)):
        result = CliRunner().invoke(main, ["generate", "--prompt", "hi", "--max-tokens", "4", "--no-chat", "--top-k", k])
        assert result.exit_code == 0, result.output
        assert result.stdout == plain.stdout  # greedy either way: top-k keeping everything changes nothing


def test_prompt_that_is_not_utf8():
    assert _usage_error(["--prompt", "caf\udce9"]) == "Error: --prompt: the prompt is not valid UTF-8 text"
    proc = subprocess.run([sys.executable, "-m", "mlx_qwenmoe", "generate"], input=b"caf\xe9 \xff\xfe",
                          capture_output=True, timeout=120)
    assert proc.returncode == 2 and b"Traceback" not in proc.stderr
    assert proc.stderr.decode().strip().splitlines()[-1] == "Error: stdin: the prompt is not valid UTF-8 text"


def test_empty_model_path_is_not_the_current_directory():
    assert _usage_error(["--model", "", "--prompt", "hi"]) == "Error: the model path is empty"


def test_mistyped_local_path(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    message = _usage_error(["--model", str(tmp_path / "modles" / "x"), "--prompt", "hi"])
    assert message == f"Error: {tmp_path / 'modles' / 'x'}: no such model directory (nor a Hugging Face repo id)"


def _cli(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mlx_qwenmoe", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, **kwargs)


def test_interrupted_generate_exits_130_without_traceback():
    proc = _cli("generate", "--prompt", "the river", "--max-tokens", "100000", "--no-chat")
    proc.stdout.read(1)  # generating
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and b"Traceback" not in err, err


def test_ctrl_c_during_start_up_imports_exits_130_without_traceback():
    proc = _cli("generate", "--prompt", "hi")
    try:
        proc.wait(timeout=1.0)  # still importing MLX and mlx-lm (several seconds)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and b"Traceback" not in err, err


def test_stdout_to_a_full_device():
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    with open("/dev/full", "wb") as full:
        proc = subprocess.run([sys.executable, "-m", "mlx_qwenmoe", "generate", "--prompt", "hi",
                               "--max-tokens", "8", "--no-chat"], stdout=full, stderr=subprocess.PIPE, timeout=120)
    assert proc.returncode == 1 and b"Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.decode().strip().splitlines()[-1] == "Error: cannot write the output (No space left on device)"
