"""Memory of the full Qwen3.5-35B-A3B shape (40 layers + MTP, vocab 248320) with random weights.

For each recipe, planned by the converter (``mlx_qwenmoe.convert.plan_conversion``: the
default 4-bit recipe and ``--fit 24GB``), prints the planned weight and cache bytes; then,
where this machine has the memory and disk for it, generates the checkpoint once (layer by
layer, on disk), loads it lazily in a child process, prefills, decodes, fills the attention
caches to 32K tokens and decodes there, and reports the child's peak RSS.

Timing on this CPU: MLX's quantized matmul runs ~0.5 GB/s at best with float32 activations
and ~10x slower with bfloat16, and a k-token forward costs ~k one-token forwards, so a token
through all 40 layers takes seconds. Activations therefore run in float32 (weights, scales and
biases stay as stored, bfloat16); the prompt and the decode are cut to what fits
``--budget-min`` after timing a probe chunk, and the report says so. The 32K context is then
stood in for by random bfloat16 K/V (what a Mac holds), decoded over for a few steps.

    nice python benchmarks/bench_memory.py                       # both recipes, as far as they fit
    nice python benchmarks/bench_memory.py --recipes fit --budget-min 15
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence


import common as C  # noqa: E402  (imports mlx_qwenmoe before mlx: see common)
import mlx.core as mx  # noqa: E402

from mlx_qwenmoe.cache import AttentionCache  # noqa: E402
from mlx_qwenmoe.config import ModelArgs  # noqa: E402
from mlx_qwenmoe.convert.memory import GiB, cache_bytes  # noqa: E402
from mlx_qwenmoe.convert.plan import Plan, plan_conversion  # noqa: E402
from mlx_qwenmoe.loading import load_model  # noqa: E402

CONTEXTS = (32768, 262144)
ACTIVATIONS = mx.float32  # see the module docstring
KV_DTYPE = mx.bfloat16  # the checkpoint's float dtype: the cache a Mac would hold
RESERVE = GiB  # activations, allocator slack, and not squeezing the other jobs on the machine
FLOOR = GiB // 2  # MemAvailable below which the measuring child gives up
ABORTED = 3  # the child's exit status when it gave up
STEPS_32K = 2  # decode steps over the stand-in 32K context


def plan_for(recipe: str, config: Dict[str, Any], fit: str) -> Plan:
    return plan_conversion(config) if recipe == "default" else plan_conversion(config, fit=fit)


def cache_nbytes(cache: Sequence[Any]) -> int:
    """Bytes the cache arrays hold (KV buffers at their allocated length, DeltaNet states)."""
    total = 0
    for c in cache:
        arrays = [c.keys, c.values] if isinstance(c, AttentionCache) else list(c.cache)
        total += sum(a.nbytes for a in arrays if a is not None)
    return total


def fill_attention_caches(cache: Sequence[Any], args: ModelArgs, context: int, room: int) -> None:
    """Stand in for a ``context``-token prompt: random K/V up to ``context - room`` in buffers of
    exactly ``context`` tokens, so the next ``room`` decode steps write in place."""
    shape = (1, args.num_key_value_heads, context, args.head_dim)
    for i, c in enumerate(cache):
        if isinstance(c, AttentionCache):
            c.keys = mx.random.normal(shape, dtype=KV_DTYPE, key=mx.random.key(2 * i))
            c.values = mx.random.normal(shape, dtype=KV_DTYPE, key=mx.random.key(2 * i + 1))
            c.offset = context - room
            mx.eval(c.keys, c.values)


def guard_memory(floor: int) -> None:
    """Abort this process, rather than let the kernel's OOM killer pick one of the machine's
    other jobs, if MemAvailable falls below ``floor`` (others' memory can grow while we run)."""

    def watch() -> None:
        while C.available_bytes() >= floor:
            time.sleep(0.25)
        print(json.dumps({"aborted": f"MemAvailable fell below {gib(floor)} at RSS {gib(C.rss_bytes())} "
                                     f"(other jobs' memory grew)"}), flush=True)
        os._exit(ABORTED)

    threading.Thread(target=watch, daemon=True).start()


def measure(directory: Path, prefill: int, decode: int, chunk: int, budget_s: float) -> Dict[str, Any]:
    """Run in a child process, so ``ru_maxrss`` is this recipe's alone. Returns the JSON-able results."""
    guard_memory(FLOOR)
    out: Dict[str, Any] = {"rss_start": C.rss_bytes()}
    start = time.perf_counter()
    model, _ = load_model(directory, lazy=True)
    out["load_s"] = time.perf_counter() - start
    out["rss_after_load"] = C.rss_bytes()
    args = model.args
    embed = model.embed
    tokens = mx.random.randint(0, args.vocab_size, (1, prefill + decode + 8), key=mx.random.key(0))
    cache = model.make_cache()

    def step(toks: mx.array) -> mx.array:
        """Tokens through the model; the logits of the last one."""
        return model.logits(model.hidden(toks, cache, embed(toks).astype(ACTIVATIONS))[:, -1])

    def run_prefill(toks: mx.array) -> None:
        for s in range(0, toks.shape[1], chunk):
            model.hidden(toks[:, s : s + chunk], cache, embed(toks[:, s : s + chunk]).astype(ACTIVATIONS))
            mx.eval(C.cache_state(cache))

    probe = 4
    out["first_chunk_s"] = C.timed(lambda: run_prefill(tokens[:, :probe]))  # pages every weight in
    out["rss_after_first_chunk"] = C.rss_bytes()
    probe_s = C.timed(lambda: run_prefill(tokens[:, probe : 2 * probe]))
    out["probe_s_per_token"] = probe_s / probe
    # Decode costs about one prefill token per step here; keep some for the 32K phase.
    affordable = int(max(0.0, budget_s - (time.perf_counter() - start)) / out["probe_s_per_token"]) - 2 * STEPS_32K
    out["decode_tokens"] = min(decode, max(2, affordable // 4))
    out["prefill_tokens"] = 2 * probe + max(0, min(prefill - 2 * probe, affordable - out["decode_tokens"]))
    rest = tokens[:, 2 * probe : out["prefill_tokens"]]
    secs = probe_s
    if rest.shape[1]:
        secs += C.timed(lambda: run_prefill(rest[:, :-1])) + C.timed(lambda: mx.eval(step(rest[:, -1:])))
    out["prefill_tok_s"] = (out["prefill_tokens"] - probe) / secs  # after the first chunk, which pages weights in
    out["rss_after_prefill"] = C.rss_bytes()

    def run_decode(n: int) -> None:
        y = tokens[:, -1:]
        for _ in range(n):
            y = mx.argmax(step(y), axis=-1, keepdims=True)
            mx.eval(y)

    out["decode_tok_s"] = out["decode_tokens"] / C.timed(lambda: run_decode(out["decode_tokens"]))
    out["rss_after_decode"] = C.rss_bytes()
    out["cache_bytes_after_decode"] = cache_nbytes(cache)
    out["peak_rss_before_32k"] = C.peak_rss_bytes()

    fill_attention_caches(cache, args, CONTEXTS[0], room=STEPS_32K)
    gc.collect()
    out["decode_32k_tok_s"] = STEPS_32K / C.timed(lambda: run_decode(STEPS_32K))
    out["cache_bytes_32k"] = cache_nbytes(cache)
    out["rss_after_32k"] = C.rss_bytes()
    out["peak_rss"] = C.peak_rss_bytes()
    out["mlx_peak_memory"] = mx.get_peak_memory()
    out["total_s"] = time.perf_counter() - start
    return out


def gib(n: Optional[float]) -> str:
    return "-" if n is None else f"{n / GiB:.2f} GiB"


def main(argv: Sequence[str] = ()) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipes", default="default,fit", help="comma list of: default, fit")
    p.add_argument("--fit", default="24GB", help="RAM of the target Mac for the fit recipe")
    p.add_argument("--prefill", type=int, default=4096, help="prompt tokens (cut to the time budget)")
    p.add_argument("--decode", type=int, default=32, help="decode tokens (cut to the time budget)")
    p.add_argument("--chunk", type=int, default=256, help="prefill chunk")
    p.add_argument("--budget-min", type=float, default=15.0, help="minutes for load + prefill + decode per recipe")
    p.add_argument("--wait-min", type=float, default=0.0, help="minutes to wait for other jobs to free the memory")
    p.add_argument("--measure", metavar="DIR", help=argparse.SUPPRESS)  # the child process
    args = p.parse_args(list(argv) or None)

    if args.measure:
        print(json.dumps(measure(Path(args.measure), args.prefill, args.decode, args.chunk, args.budget_min * 60)))
        return

    print(C.machine_report())
    config = C.hf_config("a3b-full")
    margs = ModelArgs.from_config(config)
    columns: List[str] = []
    cells: Dict[str, Dict[str, str]] = {}  # metric -> column -> value, metrics in first-seen order

    def put(metric: str, value: str) -> None:
        cells.setdefault(metric, {})[columns[-1]] = value

    for recipe in args.recipes.split(","):
        plan = plan_for(recipe, config, args.fit)
        columns.append(f"{recipe} ({plan.recipe})")
        put("weights (planned = on disk)", gib(plan.weight_bytes))
        for ctx in CONTEXTS:
            put(f"cache at {ctx:,} tokens (bf16 KV, with MTP layer)", gib(cache_bytes(margs, ctx, 2, margs.mtp_num_hidden_layers)))
        put("weights + cache 32K", gib(plan.weight_bytes + cache_bytes(margs, CONTEXTS[0], 2, margs.mtp_num_hidden_layers)))

        directory = C.CACHE_ROOT / f"a3b-full-{recipe}"
        need = plan.weight_bytes + cache_bytes(margs, CONTEXTS[0], KV_DTYPE.size) + RESERVE
        deadline = time.monotonic() + 60 * args.wait_min
        while (have := C.available_bytes()) < need and time.monotonic() < deadline:
            time.sleep(10)
        on_disk = (directory / "model.safetensors.index.json").exists()
        disk_free = shutil.disk_usage(C.require_resources(memory=0, disk=0, where=C.CACHE_ROOT)).free
        skip = None
        if need > have:
            skip = f"skipped: needs {gib(need)} (weights + 32K cache + {gib(RESERVE)} reserve), {gib(have)} available now"
        elif not on_disk and disk_free < plan.weight_bytes + 10 * GiB:
            skip = f"skipped: {gib(plan.weight_bytes)} checkpoint, {gib(disk_free)} disk free"
        if skip:
            print(f"{recipe}: {skip}", flush=True)
            put("status", skip)
            continue
        C.ensure_checkpoint(directory, config, plan)
        print(f"{recipe}: measuring in a child process ({have / GiB:.1f} GiB available) ...", flush=True)
        child = subprocess.run(
            [sys.executable, __file__, "--measure", str(directory), "--prefill", str(args.prefill),
             "--decode", str(args.decode), "--chunk", str(args.chunk), "--budget-min", str(args.budget_min)],
            capture_output=True, text=True,
        )
        last = (child.stdout.strip().splitlines() or ["{}"])[-1]
        r = json.loads(last) if last.startswith("{") else {}
        if child.returncode != 0 or "aborted" in r:
            put("status", r.get("aborted") or f"child failed (exit {child.returncode}): {child.stderr.strip().splitlines()[-1:]}")
            print(child.stderr, file=sys.stderr)
            continue
        print(f"{recipe}: {r}", flush=True)
        put("status", f"ran: prefill {r['prefill_tokens']} of {args.prefill} tokens, decode {r['decode_tokens']} "
                      f"of {args.decode} (cut to the {args.budget_min:g}-min budget)" if r["prefill_tokens"] < args.prefill
            else f"ran: prefill {r['prefill_tokens']}, decode {r['decode_tokens']}")
        put("load (lazy) s / RSS after", f"{r['load_s']:.1f} s / {gib(r['rss_after_load'])}")
        put("RSS after first chunk (all weights paged in)", gib(r["rss_after_first_chunk"]))
        put("prefill / decode tok/s (f32 activations, CPU)",
            f"{r['prefill_tok_s']:.3f} / {r['decode_tok_s']:.3f}")
        put("cache measured after prefill + decode (f32 KV)", gib(r["cache_bytes_after_decode"]))
        put("peak RSS after prefill + decode", gib(r["peak_rss_before_32k"]))
        put("cache measured at 32K (bf16 KV, no MTP layer)", gib(r["cache_bytes_32k"]))
        put("decode tok/s at 32K", f"{r['decode_32k_tok_s']:.3f}")
        put("**peak RSS at 32K**", f"**{gib(r['peak_rss'])}**")
        put("MLX peak memory", gib(r["mlx_peak_memory"]))

    print()
    print(C.table(("metric", *columns), [(m, *(by.get(c, "-") for c in columns)) for m, by in cells.items()]))


if __name__ == "__main__":
    main(sys.argv[1:])
