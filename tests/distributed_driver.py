"""Run under ``mlx.launch`` by tests/test_distributed.py: loads each case's model with its
``parallel`` mode and writes rank 0's greedy tokens (and routing counts) as JSON.

usage: distributed_driver.py CASES.json OUT.json
CASES: [{"name", "model", "parallel", "mtp", "prompt": [ids], "max_tokens", "api", "progress"}]
("progress": rank 0 prints "token N" as each token comes, for the fault test).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import mlx.core as mx

from mlx_qwenmoe.api import load
from mlx_qwenmoe.distributed import load_parallel, world
from mlx_qwenmoe.generate import generate_step
from mlx_qwenmoe.loading import load_model
from mlx_qwenmoe.speculative import mtp_generate_step


def run(case: dict) -> dict:
    group = world()
    if case.get("api"):
        model, _ = load(case["model"], parallel=case["parallel"])
    else:
        model, _ = load_parallel(lambda shard: load_model(Path(case["model"]), shard=shard), case["parallel"], group)
    prompt = mx.array(case["prompt"], dtype=mx.uint32)
    if case.get("mtp"):
        steps = mtp_generate_step(prompt, model, max_tokens=case["max_tokens"], draft_tokens=2)
    else:
        steps = generate_step(prompt, model, max_tokens=case["max_tokens"])
    tokens = []
    for t, *_ in steps:
        tokens.append(t)
        if case.get("progress"):
            print(f"token {len(tokens)}", flush=True)
    counts = {k: v.tolist() for k, v in model.routing_stats.counts().items()}
    return {"tokens": tokens, "layers": list(model.layout.layers), "routing": counts}


def main() -> None:
    cases = json.loads(Path(sys.argv[1]).read_text())
    results = {case["name"]: run(case) for case in cases}
    if world().rank() == 0:
        tmp = Path(sys.argv[2] + ".tmp")
        tmp.write_text(json.dumps(results))
        tmp.rename(sys.argv[2])


if __name__ == "__main__":
    main()
