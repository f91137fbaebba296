"""Prefill and decode speed, ours against mlx-lm's ``qwen3_5_moe``, on the same weights in one process.

Both models are built from one random 4-bit checkpoint (what ``mlx_qwenmoe convert
--bits 4`` writes: routers and DeltaNet a/b at 8 bits) and then literally share its arrays, so they differ only in code. Runs
alternate between the two, flipping the order every round. Every run is timed in
wall time and in this process's CPU time: on a shared machine wall time mostly
measures the other jobs, CPU time measures the work (tokens per CPU-second is the
rate on an otherwise idle core). The table gives tokens per CPU-second (median and
best) and the ratios ours / mlx-lm of the medians (above 1: we are faster).

Prefill is timed as mlx-lm's ``generate`` does it: all but the last prompt token
evaluated into the cache, then the last token's logits. Decode is greedy, one
token per step, from a cache prefilled once (untimed) and cloned for every run.

    nice python benchmarks/bench_speed.py                 # the full table (~25 min on 2 cores)
    nice python benchmarks/bench_speed.py --quick         # a few minutes, smaller sizes
    nice python benchmarks/bench_speed.py --configs tiny --dtypes float32 --repeats 7
    nice python benchmarks/bench_speed.py --configs a3b-4l --profile   # time per layer type
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Sequence, Tuple


import common as C  # noqa: E402  (imports mlx_qwenmoe before mlx: see common)
import mlx.core as mx  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402
from mlx_lm.utils import load_model as mlx_lm_load  # noqa: E402

from mlx_qwenmoe.loading import load_model  # noqa: E402

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16}


@dataclass(frozen=True)
class Sizes:
    prefill: Tuple[int, ...]  # prompt lengths
    decode_prompt: int
    decode_tokens: int
    repeats: int


# Sized so the default run fits ~25 min here: MLX's CPU quantized matmul reads ~0.5 GB/s with
# float32 activations and ~10x slower with bfloat16, and a k-token forward costs ~k one-token
# forwards, so the A3B-shaped model gets short prompts and few decode tokens.
PLAN: Dict[Tuple[str, str], Sizes] = {
    ("tiny", "float32"): Sizes((128, 512, 2048), 512, 128, 5),
    ("tiny", "bfloat16"): Sizes((128, 512), 512, 32, 3),
    ("a3b-4l", "float32"): Sizes((32,), 32, 8, 3),
    ("a3b-4l", "bfloat16"): Sizes((8,), 8, 2, 2),
}
QUICK: Dict[Tuple[str, str], Sizes] = {
    ("tiny", "float32"): Sizes((128,), 128, 32, 2),
    ("tiny", "bfloat16"): Sizes((128,), 128, 8, 2),
    ("a3b-4l", "float32"): Sizes((8,), 8, 2, 2),
    ("a3b-4l", "bfloat16"): Sizes((2,), 2, 1, 2),
}


def load_pair(directory: Path, dtype: mx.Dtype) -> Dict[str, Any]:
    """mlx-lm's model and ours over the same arrays (ours takes mlx-lm's, so memory is not doubled)."""
    theirs, _ = mlx_lm_load(directory, lazy=True)
    if dtype != mx.bfloat16:
        theirs.set_dtype(dtype)  # float tensors, scales and biases: the activations follow them
    mx.eval(theirs.parameters())
    ours, _ = load_model(directory, lazy=True)  # our loader's checks; its own arrays are never read
    ours.load_weights(tree_flatten(theirs.parameters()), strict=True)
    return {"ours": ours, "mlx-lm": theirs}


def prefill(model: Any, tokens: mx.array) -> List[Any]:
    cache = model.make_cache()
    model(tokens[:, :-1], cache=cache)
    mx.eval(C.cache_state(cache))
    mx.eval(model(tokens[:, -1:], cache=cache))
    return cache


def decode(model: Any, cache: List[Any], first: mx.array, n: int) -> None:
    y = first
    for _ in range(n):
        y = mx.argmax(model(y, cache=cache)[:, -1], axis=-1, keepdims=True)
        mx.eval(y)


Rates = Tuple[float, float]  # tokens per wall second, tokens per CPU second


def measure(models: Dict[str, Any], vocab: int, sizes: Sizes) -> Iterator[Tuple[str, int, Dict[str, List[Rates]]]]:
    """(phase, tokens, {model: [rates per run]}) for every prefill length, then for decode."""
    prompts = {n: mx.random.randint(0, vocab, (1, n), key=mx.random.key(n)) for n in {*sizes.prefill, sizes.decode_prompt}}
    caches: Dict[Tuple[str, int], List[Any]] = {}

    def prefill_run(name: str, n: int) -> Callable[[], Rates]:
        def run() -> Rates:
            wall, cpu = C.cpu_timed(lambda: caches.__setitem__((name, n), prefill(models[name], prompts[n])))
            return n / wall, n / cpu
        return run

    for n in sizes.prefill:
        yield "prefill", n, C.alternate({k: prefill_run(k, n) for k in models}, sizes.repeats)
    for name, model in models.items():
        if (name, sizes.decode_prompt) not in caches:
            caches[(name, sizes.decode_prompt)] = prefill(model, prompts[sizes.decode_prompt])
    first = prompts[sizes.decode_prompt][:, -1:]

    def decode_run(name: str) -> Callable[[], Rates]:
        def run() -> Rates:
            cache = C.clone_cache(caches[(name, sizes.decode_prompt)])
            mx.eval(C.cache_state(cache))
            wall, cpu = C.cpu_timed(lambda: decode(models[name], cache, first, sizes.decode_tokens))
            return sizes.decode_tokens / wall, sizes.decode_tokens / cpu
        return run

    yield f"decode@{sizes.decode_prompt}", sizes.decode_tokens, C.alternate({k: decode_run(k) for k in models}, sizes.repeats)


@contextlib.contextmanager
def timing_by_type(kinds: Dict[type, str], totals: Dict[str, float]) -> Iterator[None]:
    """Patch ``__call__`` of each class to evaluate its output and add the seconds to ``totals[kind]``.

    Evaluating after every block serialises the graph, so totals are per-block costs, not the
    fused whole; use them to compare the same block between the two models.
    """
    originals = {cls: cls.__call__ for cls in kinds}

    def wrap(cls: type, kind: str) -> Callable:
        inner = originals[cls]

        def call(self: Any, *args: Any, **kwargs: Any) -> Any:
            mx.eval(args[0])  # charge the input to the block that produced it
            start = time.process_time()
            out = inner(self, *args, **kwargs)
            mx.eval(out)
            totals[kind] += time.process_time() - start
            return out
        return call

    try:
        for cls, kind in kinds.items():
            cls.__call__ = wrap(cls, kind)
        yield
    finally:
        for cls, fn in originals.items():
            cls.__call__ = fn


def profile(models: Dict[str, Any], vocab: int, sizes: Sizes) -> str:
    """CPU milliseconds per prefill and per decode token spent in each block type, ours vs mlx-lm."""
    import mlx_lm.models.qwen3_5 as lm35
    import mlx_lm.models.qwen3_next as lmnext

    import mlx_qwenmoe.model as our

    kinds = {
        "ours": {our.GatedDeltaNet: "DeltaNet", our.Attention: "attention", our.SparseMoeBlock: "MoE"},
        "mlx-lm": {lm35.GatedDeltaNet: "DeltaNet", lmnext.Qwen3NextAttention: "attention", lmnext.Qwen3NextSparseMoeBlock: "MoE"},
    }
    n = sizes.prefill[0]
    prompt = mx.random.randint(0, vocab, (1, n), key=mx.random.key(n))
    per_token: Dict[Tuple[str, str, str], List[float]] = defaultdict(list)
    for r in range(sizes.repeats):
        for name in list(models)[:: 1 if r % 2 == 0 else -1]:
            model = models[name]
            cache = prefill(model, prompt[:, :8])  # untimed: decode starts from a short context
            runs = {
                "prefill": (n, lambda: prefill(model, prompt)),
                "decode": (sizes.decode_tokens, lambda: decode(model, cache, prompt[:, -1:], sizes.decode_tokens)),
            }
            for phase, (count, fn) in runs.items():
                totals: Dict[str, float] = defaultdict(float)
                with timing_by_type(kinds[name], totals):
                    totals["total"] = C.cpu_timed(fn)[1]
                for kind, secs in totals.items():
                    per_token[(phase, kind, name)].append(secs / count)
    rows = []
    for phase in ("prefill", "decode"):
        for kind in ("DeltaNet", "attention", "MoE", "total"):
            o = statistics.median(per_token[(phase, kind, "ours")]) * 1e3
            t = statistics.median(per_token[(phase, kind, "mlx-lm")]) * 1e3
            rows.append((phase, kind, f"{o:.2f}", f"{t:.2f}", f"{t / o:.2f}" if o else "-"))
    head = (f"CPU ms per token summed over all layers of the type (median of {sizes.repeats}; "
            f"prefill of {n} tokens, decode of {sizes.decode_tokens})")
    return head + "\n" + C.table(("phase", "block", "ours ms", "mlx-lm ms", "speed ratio"), rows)


def main(argv: Sequence[str] = ()) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default="tiny,a3b-4l", help="comma list of: tiny, a3b-4l")
    p.add_argument("--dtypes", default="float32,bfloat16", help="activation dtypes: float32, bfloat16")
    p.add_argument("--quick", action="store_true", help="smaller prompts, fewer tokens and repeats")
    p.add_argument("--repeats", type=int, help="runs per model and size (default: per config)")
    p.add_argument("--prefill", help="comma list of prompt lengths (default: per config)")
    p.add_argument("--decode-tokens", type=int, help="tokens decoded per run (default: per config)")
    p.add_argument("--decode-prompt", type=int, help="prompt length before decoding (default: per config)")
    p.add_argument("--profile", action="store_true", help="also time DeltaNet / attention / MoE blocks separately")
    args = p.parse_args(list(argv) or None)

    print(C.machine_report())
    print("both models run in this process on the same arrays: the BLAS above serves both (it helps whichever does float matmuls)")
    rows = []
    profiles = []
    for config_name in args.configs.split(","):
        config = C.hf_config(config_name)
        directory = C.ensure_checkpoint(C.CACHE_ROOT / config_name, config, C.default_plan(config))
        for dtype_name in args.dtypes.split(","):
            sizes = (QUICK if args.quick else PLAN)[(config_name, dtype_name)]
            sizes = replace(
                sizes,
                prefill=tuple(int(x) for x in args.prefill.split(",")) if args.prefill else sizes.prefill,
                decode_prompt=args.decode_prompt or sizes.decode_prompt,
                decode_tokens=args.decode_tokens or sizes.decode_tokens,
                repeats=args.repeats or sizes.repeats,
            )
            models = load_pair(directory, DTYPES[dtype_name])
            vocab = config["text_config"]["vocab_size"]
            print(f"{config_name} {dtype_name}: {sizes}", flush=True)
            for phase, n, runs in measure(models, vocab, sizes):
                (ob, om), (tb, tm) = (C.best_median([cpu for _, cpu in runs[k]]) for k in ("ours", "mlx-lm"))
                wall = {k: statistics.median(w for w, _ in runs[k]) for k in runs}
                rows.append((config_name, dtype_name, phase, n, f"{om:.2f} / {ob:.2f}", f"{tm:.2f} / {tb:.2f}",
                             f"**{om / tm:.2f}**", f"{wall['ours'] / wall['mlx-lm']:.2f}", len(runs["ours"])))
                print("  " + " ".join(map(str, rows[-1])), flush=True)
            if args.profile:
                profiles.append(f"{config_name} {dtype_name}: " + profile(models, vocab, sizes))
            del models
    print()
    print(C.table(
        ("config", "dtype", "phase", "tokens", "ours tok/CPU-s median / best", "mlx-lm tok/CPU-s median / best",
         "ratio (CPU)", "ratio (wall)", "runs"),
        rows,
    ))
    for text in profiles:
        print("\n" + text)


if __name__ == "__main__":
    main(sys.argv[1:])
