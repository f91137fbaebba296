"""Distributed inference with real ranks: ``mlx.launch --backend ring`` on localhost.

Greedy tokens of every split equal the single-process run (tiny random model in the mlx-lm
layout and in the Hugging Face fused layout, and the bundled model, with and without MTP);
a killed rank stops the others; a rank with a different checkpoint is refused.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

from mlx_qwenmoe.api import default_model_dir, load
from mlx_qwenmoe.generate import generate_step
from mlx_qwenmoe.loading import load_model
from mlx_qwenmoe.speculative import mtp_generate_step
from tiny_models import make_checkpoint

DRIVER = Path(__file__).with_name("distributed_driver.py")
PROMPT = [3, 14, 15, 9, 26, 5, 35, 8, 9, 7, 9, 3]
BUNDLED_PROMPT = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
TOKENS = 8
LAUNCH_TIMEOUT = 240


def launch(n: int, *command: str, env: dict = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["mlx.launch", "--backend", "ring", "-n", str(n), *command],
        capture_output=True, text=True, timeout=LAUNCH_TIMEOUT, env={**os.environ, **(env or {})},
    )


def run_cases(n: int, cases: list, tmp: Path) -> dict:
    spec, out = tmp / f"cases{n}.json", tmp / f"out{n}.json"
    spec.write_text(json.dumps(cases))
    proc = launch(n, sys.executable, str(DRIVER), str(spec), str(out))
    assert out.exists(), proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(out.read_text())


def single_process(model_dir, prompt, mtp=False) -> list:
    model = load(model_dir)[0] if model_dir is None else load_model(Path(model_dir))[0]
    p = mx.array(prompt, dtype=mx.uint32)
    steps = mtp_generate_step(p, model, max_tokens=TOKENS) if mtp else generate_step(p, model, max_tokens=TOKENS)
    return [t for t, *_ in steps]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The same random model twice: the Hugging Face fused layout, and the mlx-lm layout."""
    root = tmp_path_factory.mktemp("dist")
    hf, _ = make_checkpoint(root / "hf", seed=3, layout="fused")
    model, _ = load_model(hf)
    mlx_dir = root / "mlx"
    mlx_dir.mkdir()
    mx.save_safetensors(str(mlx_dir / "model.safetensors"), dict(tree_flatten(model.parameters())))
    shutil.copy(hf / "config.json", mlx_dir / "config.json")
    return {"hf": hf, "mlx": mlx_dir, "root": root}


def case(name, model, parallel, prompt=PROMPT, **kw) -> dict:
    return {"name": name, "model": str(model), "parallel": parallel, "prompt": prompt, "max_tokens": TOKENS, **kw}


def test_two_ranks_match_single_process(tiny):
    bundled = default_model_dir()
    results = run_cases(2, [
        case("mlx-expert", tiny["mlx"], "expert"),
        case("mlx-pipeline", tiny["mlx"], "pipeline"),
        case("hf-expert", tiny["hf"], "expert"),
        case("bundled-expert", bundled, None, BUNDLED_PROMPT, api=True),
        case("bundled-pipeline", bundled, "pipeline", BUNDLED_PROMPT, api=True),
        case("bundled-expert-mtp", bundled, "expert", BUNDLED_PROMPT, api=True, mtp=True),
    ], tiny["root"])
    want_tiny = single_process(tiny["mlx"], PROMPT)
    want_bundled = single_process(None, BUNDLED_PROMPT)
    assert single_process(None, BUNDLED_PROMPT, mtp=True) == want_bundled
    for name in ("mlx-expert", "mlx-pipeline", "hf-expert"):
        assert results[name]["tokens"] == want_tiny, name
    for name in ("bundled-expert", "bundled-pipeline", "bundled-expert-mtp"):
        assert results[name]["tokens"] == want_bundled, name
    assert results["mlx-pipeline"]["layers"] == [0, 1]
    routing = results["bundled-expert"]["routing"]
    # every (token, slot) pair of every forward is counted: prompt + generated tokens, k = 4
    assert sum(routing["language_model.model.layers.0.mlp"]) == (len(BUNDLED_PROMPT) + TOKENS) * 4


def test_four_ranks_expert_and_pipeline(tiny):
    bundled = default_model_dir()
    results = run_cases(4, [
        case("mlx-expert", tiny["mlx"], "expert"),
        case("mlx-both", tiny["mlx"], "expert+pipeline"),
        case("bundled-both", bundled, "expert+pipeline", BUNDLED_PROMPT, api=True),
        case("bundled-both-mtp", bundled, "expert+pipeline", BUNDLED_PROMPT, api=True, mtp=True),
    ], tiny["root"])
    want_tiny = single_process(tiny["mlx"], PROMPT)
    want_bundled = single_process(None, BUNDLED_PROMPT)
    assert results["mlx-expert"]["tokens"] == want_tiny
    assert results["mlx-both"]["tokens"] == want_tiny
    assert results["mlx-both"]["layers"] == [0, 1]  # rank 0: first stage
    assert results["bundled-both"]["tokens"] == want_bundled
    assert results["bundled-both-mtp"]["tokens"] == want_bundled


def _pid_of_rank(rank: int, tag: str) -> int:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"MLXQ_TEST_TAG={tag}".encode() in environ and f"MLX_RANK={rank}".encode() in environ:
            return int(entry.name)
    raise AssertionError(f"no process of rank {rank}")


def test_killed_rank_stops_the_others(tiny):
    spec, out = tiny["root"] / "kill.json", tiny["root"] / "kill-out.json"
    spec.write_text(json.dumps([case("long", tiny["mlx"], "expert", max_tokens=10**6, progress=True)]))
    tag = uuid.uuid4().hex
    proc = subprocess.Popen(
        ["mlx.launch", "--backend", "ring", "-n", "2", sys.executable, str(DRIVER), str(spec), str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "MLXQ_TEST_TAG": tag},
    )
    try:
        for line in proc.stdout:
            if line.startswith("token 3"):
                break
        os.kill(_pid_of_rank(1, tag), 9)
        killed = time.monotonic()
        rest = proc.communicate(timeout=30)[0]
        assert time.monotonic() - killed < 30
    finally:
        proc.kill()
    assert "rank 0: " in rest and ("another rank" in rest), rest[-2000:]
    assert not out.exists()


def test_mismatched_checkpoint_is_refused(tiny):
    other = tiny["root"] / "other"
    shutil.copytree(tiny["mlx"], other)
    config = json.loads((other / "config.json").read_text())
    config["rms_norm_eps"] = 1e-5 if config.get("rms_norm_eps") != 1e-5 else 1e-6
    (other / "config.json").write_text(json.dumps(config))
    for rank, model in ((0, tiny["mlx"]), (1, other)):
        (tiny["root"] / f"mismatch{rank}.json").write_text(json.dumps([case("m", model, "expert")]))
    script = f'exec {sys.executable} {DRIVER} {tiny["root"]}/mismatch$MLX_RANK.json {tiny["root"]}/mismatch-out.json'
    proc = launch(2, "bash", "-c", script)
    output = proc.stdout + proc.stderr
    assert "rank 1's checkpoint differs from rank 0's" in output, output[-3000:]
    assert not (tiny["root"] / "mismatch-out.json").exists()


def test_plan_refuses_what_does_not_fit_and_prints_each_rank():
    from click.testing import CliRunner

    from mlx_qwenmoe.cli import main

    config = str(Path(__file__).parent / "fixtures" / "qwen3_5_397b_a17b_config.json")
    refused = CliRunner().invoke(main, ["plan", "--model", config, "--hosts", "mac1:128GB,mac2:128GB"])
    assert refused.exit_code == 1
    assert "Error: does not fit: rank 0 (mac1) needs" in refused.output
    assert "working-set limit is 96.00 GiB" in refused.output
    raised = CliRunner().invoke(main, ["plan", "--model", config, "--hosts", "mac1:128GB@120GB,mac2:128GB@120GB"])
    assert raised.exit_code == 0, raised.output
    assert "256-511/512" in raised.output and "60 all_sums of 8192 bytes" in raised.output
    both = CliRunner().invoke(main, ["plan", "--model", config, "--hosts", "a:128GB,b:128GB,c:128GB,d:128GB",
                                     "--parallel", "expert+pipeline"])
    assert both.exit_code == 0, both.output
    assert "0-29" in both.output and "30-59" in both.output


def test_layer_split_follows_capacity():
    from mlx_qwenmoe.distributed.layout import split_layers

    assert split_layers([1] * 8, [1, 1]) == [(0, 4), (4, 8)]
    assert split_layers([1] * 8, [3, 1]) == [(0, 6), (6, 8)]
    assert split_layers([1] * 4, [1, 1, 1, 1]) == [(0, 1), (1, 2), (2, 3), (3, 4)]
