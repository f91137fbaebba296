"""MTP speculative decoding: acceptance, main-model forwards per token, and time, for k = 1..4.

For each prompt, plain decoding and MTP decoding with k = 1..4 drafts generate the same
number of tokens (greedy by default: the outputs must be identical, and the table says so).
Reported per k: acceptance (overall and by draft position: the share of rounds whose drafts
1..j were all accepted), tokens per main-model forward (plain decoding: 1), main-model
forwards per token, and time in wall and CPU seconds. On this CPU a k-token forward costs
about k one-token forwards, so forwards per token, not time, is what carries over to an
Apple GPU, where verifying k drafts costs about one decode step.

The rollback section times the two ways to undo rejected drafts in DeltaNet layers: keeping
per-token states during the verify pass (what ``speculative.py`` does) against restoring a
snapshot and re-running the accepted tokens, using the measured acceptance to weight the
re-run lengths.

    nice python benchmarks/bench_mtp.py                     # the demo model (mlx_qwenmoe/default_model)
    nice python benchmarks/bench_mtp.py --model DIR         # any checkpoint with mtp.* tensors
    nice python benchmarks/bench_mtp.py --random            # tiny random model (needs torch + transformers)
    nice python benchmarks/bench_mtp.py --temp 0.7 --top-p 0.9   # speculative sampling
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple


import common as C  # noqa: E402  (imports mlx_qwenmoe before mlx: see common)
import mlx.core as mx  # noqa: E402

from mlx_qwenmoe.cache import DeltaNetCache, restore_caches, snapshot_caches  # noqa: E402
from mlx_qwenmoe.generate import generate_step  # noqa: E402
from mlx_qwenmoe.loading import load_model  # noqa: E402
from mlx_qwenmoe.sampling import SamplerSpec  # noqa: E402
from mlx_qwenmoe.speculative import SpecStats, mtp_generate_step  # noqa: E402

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "mlx_qwenmoe" / "default_model"
# The demo model is trained on Python's standard library: prompts in that domain.
TEXT_PROMPTS = [
    "import os\nimport sys\n\n\ndef main(argv=None):\n",
    'class Queue:\n    """A simple first-in first-out queue."""\n\n    def __init__(self, maxsize=0):\n',
    "    def __repr__(self):\n        return",
    "def _parse_header(self, data):\n    for i, line in enumerate(data.splitlines()):\n",
]


def random_checkpoint() -> Path:
    """A random tiny checkpoint with an MTP layer, as the converter writes it (4-bit)."""
    config = C.hf_config("tiny")
    config["text_config"]["mtp_num_hidden_layers"] = 1
    return C.ensure_checkpoint(C.CACHE_ROOT / "tiny-mtp", config, C.default_plan(config))


def prompts(model_dir: Path, vocab: int, n: int) -> List[mx.array]:
    if (model_dir / "tokenizer.json").exists():
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        return [mx.array(tok.encode(p).ids, mx.uint32) for p in TEXT_PROMPTS[:n]]
    ids = mx.random.randint(0, vocab, (n, 24), key=mx.random.key(0)).astype(mx.uint32)
    return [ids[i] for i in range(n)]


def decode(gen: Callable[[], Any]) -> Tuple[List[int], float, float]:
    """(tokens, wall s, CPU s) of draining a token generator."""
    out: List[int] = []
    wall, cpu = C.cpu_timed(lambda: out.extend(t[0] for t in gen()))
    return out, wall, cpu


def rollback_costs(model: Any, prompt: mx.array, k: int, repeats: int) -> Dict[str, float]:
    """CPU ms of: a (k+1)-token verify forward with and without per-token DeltaNet states,
    and re-running j = 1..k+1 tokens from a snapshot (what recomputation would add)."""
    cache = model.make_cache()
    mx.eval(model.hidden(prompt[None], cache))
    snap = snapshot_caches(cache)
    block = prompt[None, : k + 1]

    def forward(tokens: mx.array, record: bool) -> Callable[[], None]:
        def run() -> None:
            restore_caches(cache, snap)
            for c in cache:
                if isinstance(c, DeltaNetCache):
                    c.record_steps = record
            mx.eval(model.hidden(tokens, cache), [c.state for c in cache])
        return run

    runs = {"verify": forward(block, False), "verify_record": forward(block, True)}
    runs.update({f"rerun{j}": forward(block[:, :j], False) for j in range(1, k + 2)})
    for run in runs.values():
        run()  # warm up
    times = C.alternate({name: (lambda r=run: C.cpu_timed(r)[1]) for name, run in runs.items()}, repeats)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def expected_rerun_ms(stats: SpecStats, costs: Dict[str, float]) -> float:
    """Mean per-round cost recomputation would add: a round that accepts a < k drafts re-runs a+1 tokens."""
    reached = [stats.rounds, *stats.accepted]  # rounds whose first j drafts were all accepted
    k = len(stats.accepted)
    return sum((reached[a] - reached[a + 1]) * costs[f"rerun{a + 1}"] for a in range(k)) / max(stats.rounds, 1)


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--random", action="store_true", help="a tiny random checkpoint with a random MTP head")
    ap.add_argument("--tokens", type=int, default=128, help="tokens generated per prompt")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--k", type=int, nargs="+", default=[1, 2, 3, 4])
    ap.add_argument("--temp", type=float, default=0.0)
    ap.add_argument("--top-p", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3, help="runs of each configuration per prompt (interleaved)")
    ap.add_argument("--rollback-repeats", type=int, default=15)
    args = ap.parse_args(argv)

    model_dir = random_checkpoint() if args.random else args.model
    if not (model_dir / "config.json").exists():
        sys.exit(f"{model_dir}: no checkpoint there (the demo model may not be trained yet): use --model or --random")
    model, _ = load_model(model_dir)
    if not model.has_mtp:
        sys.exit(f"{model_dir}: the checkpoint has no mtp.* tensors")
    sampler = SamplerSpec(temp=args.temp, top_p=args.top_p)
    ps = prompts(model_dir, model.args.vocab_size, args.prompts)

    print(C.machine_report())
    print(f"model: {'tiny random (tests/tiny_models.py, seed 3) ' if args.random else ''}{model_dir}; "
          f"{len(ps)} prompts x {args.tokens} tokens x {args.repeats} repeats; sampler {sampler}\n")

    def plain(p: mx.array) -> Callable[[], Any]:
        return lambda: generate_step(p, model, max_tokens=args.tokens, sampler=sampler)

    def spec(p: mx.array, k: int, stats: SpecStats) -> Callable[[], Any]:
        return lambda: mtp_generate_step(p, model, max_tokens=args.tokens, sampler=sampler, logits_processors=None,
                                         draft_tokens=k, stats=stats)

    # Warm up both paths (first-call allocations and compiled samplers) outside the timings.
    list(plain(ps[0])())
    list(spec(ps[0], max(args.k), SpecStats())())

    stats = {k: SpecStats() for k in args.k}
    gens: Dict[str, Callable[[mx.array], Callable[[], Any]]] = {"plain": plain}
    gens.update({f"k={k}": (lambda p, k=k: spec(p, k, stats[k])) for k in args.k})
    runs: Dict[str, List[Tuple[List[int], float, float]]] = {name: [] for name in gens}
    mx.random.seed(args.seed)
    for p in ps:
        for name, results in C.alternate({n: (lambda g=g: decode(g(p))) for n, g in gens.items()}, args.repeats).items():
            runs[name].extend(results)

    def rates(name: str) -> Tuple[float, float]:
        """Median tokens per wall second and per CPU second over all runs."""
        return (statistics.median(len(t) / w for t, w, _ in runs[name]),
                statistics.median(len(t) / c for t, _, c in runs[name]))

    base_wall, base_cpu = rates("plain")
    rows = [["plain", "-", "-", "1.00", "1.00", f"{base_wall:.1f}", f"{base_cpu:.1f}", "1.00", "-"]]
    for k in args.k:
        st, (wall, cpu) = stats[k], rates(f"k={k}")
        same = all(r[0] == b[0] for r, b in zip(runs[f"k={k}"], runs["plain"])) if sampler.greedy else "n/a (sampled)"
        rows.append([
            f"k={k}", f"{st.acceptance_rate:.1%}", " / ".join(f"{r:.0%}" for r in st.acceptance_by_position),
            f"{st.tokens_per_forward:.2f}", f"{1 / st.tokens_per_forward:.2f}",
            f"{wall:.1f}", f"{cpu:.1f}", f"{cpu / base_cpu:.2f}", str(same),
        ])
    print(C.table(["", "acceptance", "by position", "tokens / forward", "forwards / token", "tok/s wall",
                   "tok/s CPU", "CPU speed vs plain", "greedy identical"], rows))

    print(f"\nRollback of DeltaNet caches, CPU ms per round (median of {args.rollback_repeats}):")
    rows = []
    for k, st in stats.items():
        costs = rollback_costs(model, ps[0], k, args.rollback_repeats)
        rerun = expected_rerun_ms(st, costs)
        rows.append([f"k={k}", f"{costs['verify']:.1f}", f"{costs['verify_record']:.1f}",
                     f"{costs['verify_record'] - costs['verify']:+.1f}",
                     " / ".join(f"{costs[f'rerun{j}']:.1f}" for j in range(1, k + 1)), f"{rerun:.1f}"])
    print(C.table(["", "verify forward", "verify keeping per-token states", "cost of keeping states",
                   "re-run of 1..k tokens", "expected re-run per round"], rows))


if __name__ == "__main__":
    main()
