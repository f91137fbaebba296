"""Distributed inference: per-rank weights and bytes sent per generated token, ours
(expert, pipeline, expert+pipeline) against mlx-lm's ``shard()`` (tensor parallel) and
``pipeline()``, for the Qwen3.5-122B-A10B and 397B-A17B configs over 2, 4 and 8 ranks.

Planned figures are for the full models at 4 bits (group 64, the converter's recipe).
Measured figures come from real ranks (``mlx.launch --backend ring`` on this machine) loading
a random checkpoint of the same layer shapes, reduced to ``LAYERS`` layers, ``EXPERTS``
experts and a ``VOCAB`` vocabulary, in float32 rather than bfloat16 (stated in the output): resident weight bytes are MLX's
active memory after loading, and bytes sent are counted by a wrapper around
``mx.distributed.all_sum``/``all_gather``/``send`` over ``DECODE`` decode steps (ring
all_sum: 2(N-1)/N of the array per rank; all_gather: (N-1)/N of the result; send: all of it).

    python benchmarks/bench_distributed.py [--ranks 2,4,8] [--models 122b,397b]
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List

import mlx.core as mx

from common import CACHE_ROOT, available_bytes, ensure_checkpoint, table  # noqa: E402

from mlx_qwenmoe.convert.plan import plan_conversion  # noqa: E402

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures"
CONFIGS = {"122b": "qwen3_5_122b_a10b_config.json", "397b": "qwen3_5_397b_a17b_config.json"}
LAYERS, EXPERTS, VOCAB, DECODE = 8, 16, 8192, 4
OURS = ("expert", "pipeline", "expert+pipeline")
MLX_LM = ("mlx-lm shard", "mlx-lm pipeline")
GiB = 1 << 30
HEADERS = ["model", "ranks", "split", "full: GiB/rank", "full: KiB sent/token", "reduced: planned GiB/rank",
           "reduced: resident GiB", "reduced: planned KiB/token", "reduced: measured KiB/token"]


def reduced_config(name: str) -> dict:
    config = copy.deepcopy(json.loads((FIXTURES / CONFIGS[name]).read_text()))
    text = config["text_config"]
    text.update(num_hidden_layers=LAYERS, num_experts=EXPERTS, vocab_size=VOCAB, mtp_num_hidden_layers=0,
                layer_types=text["layer_types"][:LAYERS], dtype="float32")
    return config


# --- the worker: one rank ----------------------------------------------------------------

class Counter:
    """Wraps the collectives and adds up the bytes this rank sends."""

    def __init__(self, size: int):
        self.size, self.sent = size, 0
        self._orig = {k: getattr(mx.distributed, k) for k in ("all_sum", "all_gather", "send")}
        mx.distributed.all_sum = self._wrap("all_sum", lambda x: 2 * (size - 1) * x.nbytes / size)
        mx.distributed.all_gather = self._wrap("all_gather", lambda x: (size - 1) * x.nbytes)
        mx.distributed.send = self._wrap("send", lambda x: x.nbytes)

    def _wrap(self, name: str, cost):
        orig = self._orig[name]

        def counted(x, *args, **kwargs):
            self.sent += cost(x)
            return orig(x, *args, **kwargs)

        return counted


def _load(mode: str, model_dir: Path, group):
    if mode in OURS:
        from mlx_qwenmoe.distributed import load_parallel
        from mlx_qwenmoe.loading import load_model

        model, _ = load_parallel(lambda shard: load_model(model_dir, shard=shard), mode, group)
        return model, model.make_cache()
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.utils import load_model as lm_load

    model, _ = lm_load(model_dir, lazy=True, strict=False)
    if mode == "mlx-lm shard":
        model.shard(group)
    else:
        model.language_model.model.pipeline(group)
    mx.eval(model.parameters())
    return model, make_prompt_cache(model)


def measure(mode: str, model_dir: Path, group, counter: Counter) -> Dict[str, float]:
    gc.collect()
    mx.clear_cache()
    before = mx.get_active_memory()
    try:
        model, cache = _load(mode, model_dir, group)
    except Exception as e:  # noqa: BLE001  mlx-lm may not run a split: say so in the table
        return {"error": f"{type(e).__name__}: {e}".splitlines()[0][:80]}
    resident = mx.get_active_memory() - before
    y = mx.array([[1, 2, 3, 4]])
    for _ in range(2):  # prefill, then one step that is not counted either
        y = mx.argmax(model(y, cache=cache)[:, -1:], axis=-1)
        mx.eval(y)
    counter.sent = 0
    for _ in range(DECODE):
        y = mx.argmax(model(y, cache=cache)[:, -1:], axis=-1)
        mx.eval(y)
    sent = counter.sent / DECODE
    del model, cache
    return {"resident": resident, "sent": sent}


def worker(model_dir: Path, modes: List[str], out: Path) -> None:
    from mlx_qwenmoe.distributed import world

    group = world()
    counter = Counter(group.size())
    results = {}
    for mode in modes:
        mine = measure(mode, model_dir, group, counter)
        # max over ranks: the rank that needs the most memory / sends the most
        values = mx.array([[mine.get("resident", -1), mine.get("sent", -1)]], dtype=mx.float32)
        g = counter._orig["all_gather"](values, group=group).tolist()
        results[mode] = mine if "error" in mine else {"resident": max(r[0] for r in g), "sent": max(r[1] for r in g)}
    if group.rank() == 0:
        out.write_text(json.dumps(results))


# --- the driver ----------------------------------------------------------------------------

def planned(config: dict, n: int) -> Dict[str, Dict[str, float]]:
    """Our plan and mlx-lm's analytic figures: max per-rank weight bytes and bytes sent per token."""
    from mlx_qwenmoe.convert.plan import DTYPES, config_dtype
    from mlx_qwenmoe.distributed.plan import Host, plan_distributed

    hosts = [Host(f"r{i}", 1 << 50, 1 << 50) for i in range(n)]
    rows = {}
    for mode in OURS:
        if mode == "expert+pipeline" and n < 4:
            continue
        p = plan_distributed(config, hosts, mode=mode, context=0)
        rows[mode] = {"weights": max(r.weight_bytes for r in p.ranks), "sent": p.bytes_per_token}
    conv = plan_conversion(config, bits=4, group_size=64, context=0, mtp_layers=0)
    text = config.get("text_config", config)
    d, layers, vocab = text["hidden_size"], text["num_hidden_layers"], text["vocab_size"]
    embed = sum(t.nbytes for t in conv.tensors if t.kind == "embedding")
    norms = sum(t.nbytes for t in conv.tensors if t.kind == "float" and t.unit == "globals")
    ring, act = 2 * (n - 1) / n, DTYPES[config_dtype(config)]
    # shard(): everything but the embedding and the norms split N ways; per layer one all_sum
    # after the mixer and one after the MoE block, then the vocab-sharded logits gathered.
    rows["mlx-lm shard"] = {"weights": (conv.weight_bytes - embed - norms) / n + embed + norms,
                            "sent": 2 * layers * ring * d * act + (n - 1) / n * vocab * act}
    # pipeline(): layers split evenly, globals on every rank; one send per stage, then every
    # rank all_gathers the final hidden state.
    per_layer = (conv.weight_bytes - sum(t.nbytes for t in conv.tensors if t.unit == "globals")) / layers
    rows["mlx-lm pipeline"] = {"weights": per_layer * -(-layers // n) + embed + norms
                               + sum(t.nbytes for t in conv.tensors if t.kind == "head"),
                               "sent": d * act + (n - 1) * d * act}
    return rows


def launch(model_dir: Path, n: int, modes: List[str]) -> Dict[str, dict]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.json"
        cmd = ["mlx.launch", "--backend", "ring", "-n", str(n), sys.executable, __file__,
               "--worker", str(model_dir), "--modes", ",".join(modes), "--out", str(out)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        if not out.exists():
            raise RuntimeError(f"{n} ranks failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
        return json.loads(out.read_text())


def _gib(x) -> str:
    return "-" if x is None else f"{x / GiB:.2f}"


def _kib(x) -> str:
    return "-" if x is None else f"{x / 1024:.1f}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ranks", default="2,4,8")
    ap.add_argument("--models", default="122b,397b")
    ap.add_argument("--worker")
    ap.add_argument("--modes")
    ap.add_argument("--out")
    a = ap.parse_args()
    if a.worker:
        return worker(Path(a.worker), a.modes.split(","), Path(a.out))
    print(f"measured: {LAYERS} layers, {EXPERTS} experts, vocabulary {VOCAB}, real layer shapes, "
          f"4-bit group 64 (gates 8-bit), float32 activations, scales and norms (MLX's CPU runs bfloat16 ~10x slower); bytes sent averaged over {DECODE} decode steps")
    rows = []
    for name in a.models.split(","):
        full = json.loads((FIXTURES / CONFIGS[name]).read_text())
        small = reduced_config(name)
        plan = plan_conversion(small, bits=4, group_size=64, dtype="float32")  # what `convert --bits 4` writes
        model_dir = ensure_checkpoint(CACHE_ROOT / f"dist-{name}-{LAYERS}l-{EXPERTS}e-f32", small, plan)
        for n in map(int, a.ranks.split(",")):
            if available_bytes() < 4 * GiB:
                print(f"skipping {name} x {n}: less than 4 GiB of memory available")
                continue
            modes = [m for m in OURS + MLX_LM if not (m == "expert+pipeline" and n < 4)]
            measured = launch(model_dir, n, modes)
            plan_full, plan_small = planned(full, n), planned(small, n)
            for mode in modes:
                m = measured.get(mode, {})
                rows.append([name, n, mode, _gib(plan_full[mode]["weights"]), _kib(plan_full[mode]["sent"]),
                             _gib(plan_small[mode]["weights"]), m.get("error") or _gib(m.get("resident")),
                             _kib(plan_small[mode]["sent"]), "" if "error" in m else _kib(m.get("sent"))])
            print(table(HEADERS, rows[-len(modes):]), flush=True)
    print(table(HEADERS, rows))


if __name__ == "__main__":
    main()
