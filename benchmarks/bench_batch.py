"""Continuous batching on this CPU: aggregate decode tokens/s at batch 1, 2, 4, 8, ours against
mlx-lm's ``BatchGenerator`` on the same weights, and how often a batch changes greedy tokens.

Throughput: B requests with different prompts are started, then K decode steps (B tokens each)
are timed once every request is decoding, for three drivers on the same checkpoint: our
``BatchEngine`` on our model, mlx-lm's ``BatchGenerator`` on mlx-lm's ``qwen3_5_moe`` model,
and mlx-lm's ``BatchGenerator`` on our model (its batch cache protocol, our forward). The
runs alternate (``common.alternate``) and the EOS tokens are masked out of a shared greedy
sampler so no row leaves early. CPU seconds (all threads of this process) are the stable
measure on a shared machine; wall seconds are printed beside them.

Exactness: each prompt decoded greedily alone and inside a batch of 8; a token "differs" from
the first position where the two sequences part (after that they are different texts).

    nice python benchmarks/bench_batch.py                  # the bundled demo model (4-bit)
    nice python benchmarks/bench_batch.py --model DIR --steps 32
"""

from __future__ import annotations

import argparse
import inspect
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as C  # noqa: E402  (imports mlx_qwenmoe before mlx: see common)
import mlx.core as mx  # noqa: E402
from mlx_lm import load as mlx_lm_load  # noqa: E402
from mlx_lm.generate import BatchGenerator  # noqa: E402

from mlx_qwenmoe import BatchEngine, generate_step, load  # noqa: E402
from mlx_qwenmoe.api import resolve  # noqa: E402

BATCHES = (1, 2, 4, 8)


def code_prompts(tokenizer: Any, n: int, length: int) -> List[List[int]]:
    """``n`` different ``length``-token stretches of Python source (the demo model's domain)."""
    import json.decoder
    import textwrap

    text = inspect.getsource(json.decoder) + inspect.getsource(textwrap)
    ids = tokenizer.encode(text)
    stride = (len(ids) - length) // n
    return [ids[i * stride : i * stride + length] for i in range(n)]


def no_eos_greedy(eos: Sequence[int], vocab: int) -> Callable[[mx.array], mx.array]:
    block = mx.zeros((vocab,)).at[mx.array(list(eos))].add(-mx.inf) if eos else mx.zeros((vocab,))
    return lambda logprobs: mx.argmax(logprobs + block, axis=-1)


def engine_run(model: Any, tokenizer: Any, prompts: List[List[int]], sampler: Callable, steps: int) -> Callable:
    def run() -> tuple:
        engine = BatchEngine(model, tokenizer, max_batch=len(prompts), prefill_step_size=512)
        for p in prompts:
            engine.submit(p, max_tokens=steps + 2 * len(prompts) + 2, sampler=sampler)
        while len(engine.step()) < len(prompts):
            pass
        return C.cpu_timed(lambda: [engine.step() for _ in range(steps)])

    return run


def generator_run(model: Any, prompts: List[List[int]], sampler: Callable, steps: int) -> Callable:
    def run() -> tuple:
        gen = BatchGenerator(
            model, stop_tokens=[], sampler=sampler, completion_batch_size=len(prompts),
            prefill_batch_size=len(prompts), prefill_step_size=512,
        )
        gen.insert(prompts, [steps + 2 * len(prompts) + 2] * len(prompts))
        while len(gen.next_generated()) < len(prompts):
            pass
        times = C.cpu_timed(lambda: [gen.next_generated() for _ in range(steps)])
        gen.close()
        return times

    return run


def throughput(models: Dict[str, Any], tokenizer: Any, prompts: List[List[int]], steps: int, repeats: int) -> None:
    sampler = no_eos_greedy(sorted(tokenizer.eos_token_ids), models["ours"].args.vocab_size)
    drivers = {
        "ours: BatchEngine": lambda b: engine_run(models["ours"], tokenizer, prompts[:b], sampler, steps),
        "mlx-lm: BatchGenerator + qwen3_5_moe": lambda b: generator_run(models["mlx-lm"], prompts[:b], sampler, steps),
        "mlx-lm BatchGenerator + our model": lambda b: generator_run(models["ours"], prompts[:b], sampler, steps),
    }
    # every (driver, batch) pair in one alternation, so the ratios between batch sizes see the same load
    runs = {(name, b): make(b) for b in BATCHES for name, make in drivers.items()}
    results = C.alternate(runs, repeats)
    best = {key: C.best_median([key[1] * steps / cpu for _, cpu in times]) for key, times in results.items()}
    rows = []
    for (name, b), times in results.items():
        cpu_best, cpu_median = best[name, b]
        wall_best, _ = C.best_median([b * steps / wall for wall, _ in times])
        rows.append([name, b, f"{cpu_best:.1f}", f"{cpu_median:.1f}", f"{wall_best:.1f}",
                     f"{cpu_best / best[name, 1][0]:.2f}x",
                     f"{cpu_best / best['mlx-lm: BatchGenerator + qwen3_5_moe', b][0]:.2f}x"])
    print(f"\nAggregate decode tokens/s, {steps} steps timed after every request is decoding, best of {repeats}")
    headers = ["driver", "batch", "tok/CPU-s (best)", "tok/CPU-s (median)", "tok/wall-s (best)", "vs batch 1",
               "vs mlx-lm at this batch"]
    print(C.table(headers, rows))


def exactness(model: Any, prompts: List[List[int]], tokenizer: Any, tokens: int) -> None:
    engine = BatchEngine(model, tokenizer, max_batch=len(prompts), prefill_step_size=512)
    sampler = no_eos_greedy(sorted(tokenizer.eos_token_ids), model.args.vocab_size)
    ids = [engine.submit(p, max_tokens=tokens, sampler=sampler) for p in prompts]
    batched: Dict[int, List[int]] = {i: [] for i in ids}
    while engine.has_work():
        for e in engine.step():
            batched[e.request_id].append(e.token)
    differing, parted = 0, []
    for i, p in zip(ids, prompts):
        alone = [t for t, _ in generate_step(mx.array(p), model, max_tokens=tokens, sampler=sampler, prefill_step_size=512)]
        first = next((j for j, (a, b) in enumerate(zip(alone, batched[i])) if a != b), None)
        if first is not None:
            differing += tokens - first
            parted.append(first)
    total = tokens * len(prompts)
    print(f"\nGreedy exactness, batch of {len(prompts)} vs alone, {tokens} tokens each: "
          f"{differing}/{total} tokens differ ({100 * differing / total:.2f}%); "
          f"sequences that part: {len(parted)} (at positions {parted})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="checkpoint directory (default: the bundled demo model)")
    parser.add_argument("--steps", type=int, default=64, help="decode steps timed per run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=48)
    parser.add_argument("--exact-tokens", type=int, default=200)
    opts = parser.parse_args()
    print(C.machine_report())
    directory = resolve(opts.model)
    ours, tokenizer = load(directory)
    theirs, _ = mlx_lm_load(str(directory))
    prompts = code_prompts(tokenizer, max(BATCHES), opts.prompt_tokens)
    print(f"model: {directory}; prompts: {len(prompts)} x {opts.prompt_tokens} tokens")
    throughput({"ours": ours, "mlx-lm": theirs}, tokenizer, prompts, opts.steps, opts.repeats)
    exactness(ours, prompts, tokenizer, opts.exact_tokens)


if __name__ == "__main__":
    main()
