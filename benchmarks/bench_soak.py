"""Soak: memory and per-token time over a long generation and over repeated load/generate cycles.

Two phases with the bundled demo model:

1. one generation of ``--tokens`` tokens (10,000; greedy, EOS ignored), sampling RSS, the cache's
   own bytes and wall/CPU time every ``--every`` tokens. The attention KV cache grows with the
   context by design, so the leak signal is RSS minus cache bytes; per-token time is reported
   for the first and last thousand tokens (attention over a longer context costs a little more);
2. ``--cycle-seconds`` (120) of ``load()`` + a 64-token generation, again and again, RSS after
   each cycle: after warm-up it must stay flat within noise.

The curves go to stdout as tables and to ``--out`` (JSON; its folder is created).

    python benchmarks/bench_soak.py                            # both phases, ~5-8 min on an idle machine
    python benchmarks/bench_soak.py --phase generation --out soak/gen.json   # one phase per process
    nice python benchmarks/bench_soak.py --tokens 2000 --cycle-seconds 20   # a quick look
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Sequence

import mlx.core as mx
from mlx.utils import tree_flatten

sys.path.insert(0, str(Path(__file__).parent))
import common as C  # noqa: E402

from mlx_qwenmoe import generate, load  # noqa: E402
from mlx_qwenmoe.generate import generate_step  # noqa: E402

MiB = 1 << 20
PROMPT = "The history of the river begins"


def _cache_bytes(cache: Sequence[Any]) -> int:
    return sum(a.nbytes for _, a in tree_flatten(C.cache_state(cache)) if isinstance(a, mx.array))


def long_generation(tokens: int, every: int) -> List[Dict[str, float]]:
    """One greedy generation of ``tokens`` tokens; a sample every ``every`` tokens."""
    model, tokenizer = load()
    cache = model.make_cache()
    prompt = mx.array(tokenizer.encode(PROMPT), dtype=mx.uint32)
    samples: List[Dict[str, float]] = []
    wall, cpu = time.perf_counter(), time.process_time()
    for n, _ in enumerate(generate_step(prompt, model, max_tokens=tokens, cache=cache), start=1):
        if n % every == 0:
            now_wall, now_cpu = time.perf_counter(), time.process_time()
            samples.append(dict(tokens=n, rss=C.rss_bytes(), cache=_cache_bytes(cache),
                                ms_per_token=1e3 * (now_wall - wall) / every, cpu_ms_per_token=1e3 * (now_cpu - cpu) / every))
            print(f"  {n} tokens: RSS {samples[-1]['rss'] / MiB:.1f} MiB", flush=True)
            wall, cpu = now_wall, now_cpu
    return samples


def load_cycles(seconds: float) -> List[Dict[str, float]]:
    """``load()`` + a 64-token generation until ``seconds`` have passed; RSS after each cycle."""
    samples: List[Dict[str, float]] = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        model, tokenizer = load()
        generate(model, tokenizer, PROMPT, max_tokens=64)
        del model, tokenizer
        gc.collect()
        mx.clear_cache()
        samples.append(dict(cycle=len(samples) + 1, seconds=time.perf_counter() - start, rss=C.rss_bytes()))
    return samples


def _mean(rows: Sequence[Dict[str, float]], key: str) -> float:
    return statistics.fmean(r[key] for r in rows)


def generation_summary(gen: List[Dict[str, float]], every: int) -> Dict[str, Any]:
    head = gen[1 : 1 + 1000 // every]  # the first sample holds the prefill and warm-up
    tail = gen[-(1000 // every):]
    return dict(
        rss_start_mib=gen[0]["rss"] / MiB, rss_end_mib=gen[-1]["rss"] / MiB,
        cache_end_mib=gen[-1]["cache"] / MiB,
        rss_minus_cache_start_mib=(gen[0]["rss"] - gen[0]["cache"]) / MiB,
        rss_minus_cache_end_mib=(gen[-1]["rss"] - gen[-1]["cache"]) / MiB,
        ms_per_token_first_1k=_mean(head, "ms_per_token"), ms_per_token_last_1k=_mean(tail, "ms_per_token"),
        cpu_ms_per_token_first_1k=_mean(head, "cpu_ms_per_token"), cpu_ms_per_token_last_1k=_mean(tail, "cpu_ms_per_token"),
    )


def cycles_summary(cycles: List[Dict[str, float]]) -> Dict[str, Any]:
    warm = cycles[len(cycles) // 5 :] or cycles  # the first fifth is warm-up
    return dict(
        cycles=len(cycles), cycle_rss_first_mib=cycles[0]["rss"] / MiB,
        cycle_rss_after_warmup_mib=warm[0]["rss"] / MiB, cycle_rss_end_mib=cycles[-1]["rss"] / MiB,
        cycle_rss_min_after_warmup_mib=min(c["rss"] for c in warm) / MiB,
        cycle_rss_max_after_warmup_mib=max(c["rss"] for c in warm) / MiB,
    )


def main(argv: Sequence[str] = ()) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=10_000)
    p.add_argument("--every", type=int, default=250, help="tokens between samples")
    p.add_argument("--cycle-seconds", type=float, default=120.0)
    p.add_argument("--phase", choices=("all", "generation", "cycles"), default="all",
                   help="run one phase only (each then stays under 10 minutes on a loaded machine)")
    p.add_argument("--out", type=Path, default=C.CACHE_ROOT / "soak.json")
    args = p.parse_args(argv)
    if args.tokens < 2000 or args.every < 1 or args.tokens % args.every:
        p.error("--tokens must be at least 2000 and a multiple of --every")
    C.require_resources(memory=2 << 30, disk=16 << 20, where=args.out.parent)

    print(C.machine_report(), flush=True)
    result: Dict[str, Any] = {}
    if args.phase in ("all", "generation"):
        result["generation"] = gen = long_generation(args.tokens, args.every)
        result["generation_summary"] = generation_summary(gen, args.every)
        _print_generation(gen)
    if args.phase in ("all", "cycles"):
        result["cycles"] = cycles = load_cycles(args.cycle_seconds)
        result["cycles_summary"] = cycles_summary(cycles)
        print(C.table(("cycle", "s", "RSS MiB"), [(c["cycle"], f"{c['seconds']:.1f}", f"{c['rss'] / MiB:.1f}") for c in cycles]))
    print(json.dumps({k: v for k, v in result.items() if k.endswith("summary")}, indent=1))
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


def _print_generation(gen: List[Dict[str, float]]) -> None:
    print(C.table(("tokens", "RSS MiB", "cache MiB", "RSS - cache MiB", "wall ms/token", "CPU ms/token"), [
        (r["tokens"], f"{r['rss'] / MiB:.1f}", f"{r['cache'] / MiB:.1f}", f"{(r['rss'] - r['cache']) / MiB:.1f}",
         f"{r['ms_per_token']:.2f}", f"{r['cpu_ms_per_token']:.2f}") for r in gen]), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
