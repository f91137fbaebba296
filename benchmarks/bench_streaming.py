"""Streamed experts (``--max-resident``): memory, bytes read per token, hit rates, projected Mac speed.

(a) The full Qwen3.5-35B-A3B shape (random weights, the converter's ``--fit 24GB`` plan, the
    checkpoint ``bench_memory.py`` also uses) loaded with ``max_resident=6GiB`` in a child
    process: peak RSS against 6 GiB + dense weights + cache + 0.5 GiB, bytes read per decode
    token and the hit rate on its (random) routing; then, with the same slot count, hit rate
    and bytes per token on a uniform trace and a stated Zipf-skewed trace (bookkeeping only).
(b) Routing traces of the bundled model on its held-out text: hit rate against cache size for
    LRU and LFU, prefetch off and on, and the prefetch prediction accuracy.
(c) Projected decode tok/s on a Mac: t = t_resident + (1 - h) * B / W_ssd (reads not overlapped).

    nice python benchmarks/bench_streaming.py                 # all three
    nice python benchmarks/bench_streaming.py --parts b,c     # no 35B checkpoint needed
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple


import common as C  # noqa: E402  (imports mlx_qwenmoe before mlx: see common)
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
from bench_memory import ABORTED, FLOOR, cache_nbytes, gib, guard_memory, plan_for  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

from mlx_qwenmoe.api import default_model_dir, load  # noqa: E402
from mlx_qwenmoe.convert.memory import GiB, parse_size  # noqa: E402
from mlx_qwenmoe.expert_stream import moe_blocks, stream_experts  # noqa: E402
from mlx_qwenmoe.expert_stream.slotmap import SlotMap  # noqa: E402
from mlx_qwenmoe.loading import load_model  # noqa: E402
from mlx_qwenmoe.ops.moe import route, routed_experts  # noqa: E402

ACTIVATIONS = mx.float32  # as bench_memory: MLX's CPU qmm is far slower with bf16 activations
ZIPF_S = 1.0  # P(expert of popularity rank r) ~ 1 / r^s, ranks shuffled per layer; tokens i.i.d.
TRACE_TOKENS = 400


# --- (b) routing traces and the slot policy -----------------------------------------------


class _Recorder:
    """A ``SparseMoeBlock.streamed`` hook that records the routing and the next layer's prediction."""

    def __init__(self, next_block=None):
        self.next_block, self.ids, self.predicted = next_block, [], []

    def __call__(self, x, inds, weights, experts, shared, gate):
        self.ids.append(np.array(inds).reshape(-1, inds.shape[-1]))
        if self.next_block is not None:
            _, nxt = route(self.next_block.gate(x), self.next_block.top_k, False)
            self.predicted.append(np.array(nxt).reshape(-1, nxt.shape[-1]))
        return routed_experts(x, inds, weights, experts, shared, gate)


def bundled_traces() -> Tuple[List[np.ndarray], List[np.ndarray], int]:
    """Per main MoE layer: expert ids (T, k) on the held-out text, and the ids predicted for it
    by the previous layer's prefetch (None for the first layer); and the number of experts."""
    model, tokenizer = load()
    blocks = [b for p, b in moe_blocks(model) if not p.startswith("mtp.")]
    recorders = [_Recorder(nxt) for nxt in blocks[1:]] + [_Recorder()]
    for block, rec in zip(blocks, recorders):
        block.streamed = rec
    ids = tokenizer.encode((default_model_dir() / "heldout_sample.txt").read_text())
    mx.eval(model(mx.array([ids])))
    routed = [np.concatenate(r.ids) for r in recorders]
    predicted = [None] + [np.concatenate(r.predicted) for r in recorders[:-1]]
    return routed, predicted, blocks[0].switch_mlp.gate_proj.weight.shape[0]


def simulate(routed: Sequence[np.ndarray], predicted: Sequence[Any], num_experts: int, slots: int,
             policy: str, prefetch: bool) -> Dict[str, float]:
    """Token by token through the layers, as ``ExpertSlots`` does: hit rate and expert reads per token."""
    maps = [SlotMap(num_experts, slots, policy) for _ in routed]
    hits = lookups = reads = 0
    tokens = routed[0].shape[0]
    for t in range(tokens):
        for layer, m in enumerate(maps):
            if prefetch and predicted[layer] is not None:
                ahead = m.missing(np.unique(predicted[layer][t]))[:slots]
                m.claim(ahead, keep=ahead[:0])
                reads += ahead.size
            needed = np.unique(routed[layer][t])
            missing = m.missing(needed)
            lookups += needed.size
            hits += needed.size - missing.size
            if missing.size:
                m.claim(missing, keep=needed)
                reads += missing.size
            m.use(needed)
    return {"hit": hits / lookups, "reads_per_token": reads / tokens}


def prefetch_accuracy(routed: Sequence[np.ndarray], predicted: Sequence[Any]) -> float:
    """Fraction of each layer's routed experts that the previous layer's prefetch predicted."""
    got = total = 0
    for ids, pred in zip(routed, predicted):
        if pred is None:
            continue
        for a, p in zip(ids, pred):
            got += np.isin(a, p).sum()
            total += a.size
    return got / total


def part_b() -> Dict[str, Any]:
    routed, predicted, num_experts = bundled_traces()
    top_k = routed[0].shape[1]
    rows, results = [], {}
    for slots in range(top_k, num_experts + 1, 2):
        row = [f"{slots} / {num_experts} ({slots / num_experts:.0%})"]
        for policy in ("lru", "lfu"):
            for prefetch in (False, True):
                r = simulate(routed, predicted, num_experts, slots, policy, prefetch)
                results[(slots, policy, prefetch)] = r
                row.append(f"{r['hit']:.1%} / {r['reads_per_token']:.2f}")
        rows.append(row)
    acc = prefetch_accuracy(routed, predicted)
    print(f"\n(b) bundled model, {routed[0].shape[0]} held-out tokens, {len(routed)} MoE layers, top-{top_k} of "
          f"{num_experts}; cell = hit rate / expert reads per token (prefetch reads included)")
    print(C.table(("slots per layer", "LRU", "LRU + prefetch", "LFU", "LFU + prefetch"), rows))
    print(f"prefetch accuracy (next layer's router on this layer's input): {acc:.1%} of routed experts predicted")
    return {"results": results, "accuracy": acc, "num_experts": num_experts,
            "lookups_per_token": sum(ids.shape[1] for ids in routed)}


# --- (a) the 35B-A3B shape with a 6 GiB budget --------------------------------------------


def measure(directory: Path, budget: int, prompt: int, decode: int) -> Dict[str, Any]:
    """In a child process, so ``ru_maxrss`` is this run's alone."""
    guard_memory(FLOOR)
    out: Dict[str, Any] = {"rss_start": C.rss_bytes()}
    model, _ = load_model(directory, lazy=True)
    stream = stream_experts(model, directory, budget, prefetch=True)
    mx.eval(model.parameters())
    out["slots"], out["layers"] = stream.num_slots, len(stream.layers)
    out["expert_bytes"] = stream.layers[0].expert_bytes
    out["resident_experts"] = stream.resident_bytes()
    out["dense"] = sum(v.nbytes for _, v in tree_flatten(model.parameters())) - stream.resident_bytes()
    out["rss_after_load"] = C.rss_bytes()
    embed = model.embed
    cache = model.make_cache()
    toks = mx.random.randint(0, model.args.vocab_size, (1, prompt), key=mx.random.key(0))
    step = lambda t: model.logits(model.hidden(t, cache, embed(t).astype(ACTIVATIONS))[:, -1])  # noqa: E731
    y = mx.argmax(step(toks), axis=-1, keepdims=True)
    mx.eval(y)
    stream.stats.reset()
    start = time.perf_counter()
    for _ in range(decode):
        y = mx.argmax(step(y), axis=-1, keepdims=True)
        mx.eval(y)
    out["decode_s_per_token"] = (time.perf_counter() - start) / decode
    s = stream.stats
    out.update(hit=s.hits / s.lookups, bytes_per_token=s.bytes_read / s.tokens, decode=s.tokens,
               prefetch_accuracy=s.predicted_used / max(s.needed_after_prediction, 1))
    out["cache"] = cache_nbytes(cache)
    out["peak_rss"] = C.peak_rss_bytes()
    out["mlx_peak"] = mx.get_peak_memory()
    stream.close()
    return out


def synthetic_trace(num_layers: int, num_experts: int, top_k: int, tokens: int, zipf: float, seed: int = 0):
    """(T, k) expert ids per layer: uniform (zipf 0) or Zipf-skewed popularity, i.i.d. over tokens."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, num_experts + 1) ** zipf
    p /= p.sum()
    layers = []
    for _ in range(num_layers):
        perm = rng.permutation(num_experts)
        layers.append(np.stack([perm[rng.choice(num_experts, top_k, replace=False, p=p)] for _ in range(tokens)]))
    return layers


def part_a(args) -> Dict[str, Any]:
    config = C.hf_config("a3b-full")
    plan = plan_for("fit", config, "24GB")
    directory = C.CACHE_ROOT / "a3b-full-fit"
    need = 6 * GiB + 4 * GiB  # budget + dense weights + activations, roughly
    disk_free = shutil.disk_usage(C.CACHE_ROOT.parent if not C.CACHE_ROOT.exists() else C.CACHE_ROOT).free
    if C.available_bytes() < need:
        print(f"(a) skipped: needs ~{gib(need)} free memory, {gib(C.available_bytes())} available")
        return {}
    if not (directory / "model.safetensors.index.json").exists() and disk_free < plan.weight_bytes + 10 * GiB:
        print(f"(a) skipped: {gib(plan.weight_bytes)} checkpoint, {gib(disk_free)} disk free")
        return {}
    C.ensure_checkpoint(directory, config, plan)
    child = subprocess.run(
        [sys.executable, __file__, "--measure", str(directory), "--budget", args.budget,
         "--prompt", str(args.prompt), "--decode", str(args.decode)], capture_output=True, text=True)
    last = (child.stdout.strip().splitlines() or ["{}"])[-1]
    r = json.loads(last) if last.startswith("{") else {}
    if child.returncode != 0 or not r:
        print(f"(a) child failed (exit {child.returncode}{', memory guard' if child.returncode == ABORTED else ''}): "
              f"{child.stderr.strip().splitlines()[-3:]}")
        return {}
    budget = parse_size(args.budget)
    rows = [
        ("checkpoint (--fit 24GB plan), on disk", gib(plan.weight_bytes)),
        ("slots per MoE layer (of 256) x layers", f"{r['slots']} x {r['layers']} ({r['expert_bytes'] / 2**20:.2f} MiB per expert)"),
        ("resident experts / dense weights / cache", f"{gib(r['resident_experts'])} / {gib(r['dense'])} / {gib(r['cache'])}"),
        ("**peak RSS** (goal: budget + dense + cache + 0.5 GiB)",
         f"**{gib(r['peak_rss'])}** (goal {gib(budget + r['dense'] + r['cache'] + GiB // 2)})"),
        (f"decode, {r['decode']} tokens after a {args.prompt}-token prompt: hit rate / read per token",
         f"{r['hit']:.1%} / {r['bytes_per_token'] / 2**20:.0f} MiB (prefetch accuracy {r['prefetch_accuracy']:.1%})"),
        ("RSS before load (interpreter + libraries) / after load / MLX peak",
         f"{gib(r['rss_start'])} / {gib(r['rss_after_load'])} / {gib(r['mlx_peak'])}"),
        ("decode s/token on this CPU (f32 activations)", f"{r['decode_s_per_token']:.2f}"),
    ]
    for name, zipf in (("uniform", 0.0), (f"Zipf s={ZIPF_S:g}", ZIPF_S)):
        trace = synthetic_trace(r["layers"], 256, 8, TRACE_TOKENS, zipf)
        sim = simulate(trace, [None] * len(trace), 256, r["slots"], "lfu", False)
        rows.append((f"{name} routing, {TRACE_TOKENS} tokens, LFU: hit rate / read per token",
                     f"{sim['hit']:.1%} / {sim['reads_per_token'] * r['expert_bytes'] / 2**20:.0f} MiB"))
        r[f"sim_{name.split()[0].lower()}"] = sim
    print(f"\n(a) Qwen3.5-35B-A3B shape, random weights, max_resident={args.budget}")
    print(C.table(("metric", "value"), rows))
    return r


# --- (c) projected decode speed on a Mac ---------------------------------------------------

# Published figures and hardware assumptions the projection rests on (sources in benchmarks/README.md).
MACS = {
    # name: (model, layers, top_k, experts, hidden, moe_intermediate, expert budget GiB, SSD GB/s, t_resident s)
    "35B-A3B, 16 GB Mac mini M4": ("35B-A3B", 40, 8, 256, 2048, 512, 6.0, 3.0, 1 / 60),
    "397B-A17B, 128 GB M5 Max": ("397B-A17B", 60, 10, 512, 4096, 1024, 86.0, 6.0, 1 / 35.6),
}


def expert_bytes_4bit(hidden: int, inter: int, group: int = 64) -> int:
    """One expert's gate, up and down projections at 4 bits with bf16 scales and biases."""
    per_proj = hidden * inter // 2 + 2 * 2 * hidden * inter // group
    return 3 * per_proj


def interpolated(table: Dict[Tuple[int, str, bool], Dict[str, float]], num_experts: int, fraction: float,
                 prefetch: bool, key: str) -> float:
    """A bundled-trace LFU figure at cache ``fraction``, interpolated between the measured sizes."""
    sizes = sorted({s for s, _, _ in table})
    xs = [s / num_experts for s in sizes]
    return float(np.interp(fraction, xs, [table[(s, "lfu", prefetch)][key] for s in sizes]))


def part_c(b: Dict[str, Any], a: Dict[str, Any]) -> None:
    """Serial: demand misses stall the token. Prefetch: all reads (wasted ones too) overlap compute."""
    rows = []
    for mac, (name, layers, k, experts, hidden, inter, budget, ssd, t_res) in MACS.items():
        eb = expert_bytes_4bit(hidden, inter)
        per_token = layers * k * eb
        fraction = min(budget * GiB / (layers * experts * eb), 1.0)
        cases = [("uniform routing, no prefetch", fraction, None)]
        if a.get("sim_zipf") and name == "35B-A3B":
            cases.append((f"Zipf s={ZIPF_S:g} (simulated), no prefetch", a["sim_zipf"]["hit"], None))
        if b:
            n, lookups = b["num_experts"], b["lookups_per_token"]
            cases.append(("bundled trace, LFU, no prefetch", interpolated(b["results"], n, fraction, False, "hit"), None))
            reads = interpolated(b["results"], n, fraction, True, "reads_per_token") / lookups
            cases.append(("bundled trace, LFU + prefetch", interpolated(b["results"], n, fraction, True, "hit"), reads))
        for label, h, reads in cases:
            if reads is None:
                read = (1 - h) * per_token
                tok_s = 1 / (t_res + read / (ssd * 1e9))
            else:
                read = reads * per_token
                tok_s = 1 / max(t_res, read / (ssd * 1e9))
            rows.append((mac, f"{fraction:.0%}", label, f"{h:.1%}", f"{read / 2**20:.0f}", f"{tok_s:.1f}"))
    print("\n(c) projected decode tok/s: serial 1 / (t_resident + (1 - h) B / W_ssd); "
          "with prefetch 1 / max(t_resident, reads B / W_ssd)")
    print(C.table(("Mac", "experts cached", "case", "hit rate h", "MiB read / token", "tok/s"), rows))


def main(argv: Sequence[str] = ()) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", default="a,b,c", help="comma list of: a, b, c")
    p.add_argument("--budget", default="6GiB", help="max_resident for (a)")
    p.add_argument("--prompt", type=int, default=4, help="prompt tokens for (a)")
    p.add_argument("--decode", type=int, default=4, help="decode tokens for (a)")
    p.add_argument("--measure", metavar="DIR", help=argparse.SUPPRESS)  # the child process
    args = p.parse_args(list(argv) or None)
    if args.measure:
        print(json.dumps(measure(Path(args.measure), parse_size(args.budget), args.prompt, args.decode)))
        return
    print(C.machine_report())
    parts = args.parts.split(",")
    a = part_a(args) if "a" in parts else {}
    b = part_b() if "b" in parts or "c" in parts else {}
    if "c" in parts:
        part_c(b, a)


if __name__ == "__main__":
    main(sys.argv[1:])
