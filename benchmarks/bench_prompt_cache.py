"""Prompt cache: prompt tokens computed per request, ours against mlx-lm's LRUPromptCache, on
seven scripted multi-turn transcripts replayed token for token.

Each transcript is a list of requests (chat messages, then the assistant reply that request
gets). Both caches see the same token ids, rendered with a Qwen3.5-style template (tools in the
system turn, thinking dropped from assistant turns before the last user message, tool results as
user turns), and the same replies, forced token by token.

- Ours: ``stream_generate(..., prompt_cache=PromptCache(model, budget), boundaries=...)`` on the
  demo model, the reply forced through the sampler. Time to first token is measured (wall and
  this process's CPU seconds; the machine is shared, so CPU seconds are the stable figure).
- mlx-lm: ``LRUPromptCache`` fed as ``mlx_lm.server`` feeds it for a batchable model such as
  Qwen3.5 (its own ``ResponseGenerator._tokenize`` splits the prompt into system / user /
  thinking-tail segments; ``fetch_nearest_cache`` on arrival; ``insert_cache`` at each segment
  end inside the prompt and, with prompt + generated tokens but the last, at the end). Its
  decisions depend only on tokens, ``nbytes`` and ``is_trimmable()``, so its entries are
  stand-ins that report the bytes our model's caches hold for that many tokens (attention KV of
  exactly that length, which undercounts mlx-lm's 256-token buffer steps, plus DeltaNet states);
  the hybrid caches are not trimmable, as in mlx-lm. Its time to first token is estimated from
  the tokens it computes, on a least-squares line through ours (CPU seconds against tokens
  computed) measured in the same runs.

    nice python benchmarks/bench_prompt_cache.py                    # all seven, the default interval
    nice python benchmarks/bench_prompt_cache.py --only agent,edited --interval 64 --detail
    # one process per transcript (each under 10 minutes here), then one table:
    nice python benchmarks/bench_prompt_cache.py --only agent --save out/agent.json   # ... for each
    python benchmarks/bench_prompt_cache.py --combine out/*.json --detail
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict, List, Sequence, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as C  # noqa: E402  (imports mlx_qwenmoe before mlx: see common)
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
from mlx_lm.models.cache import LRUPromptCache, _BaseCache  # noqa: E402
from mlx_lm.server import ResponseGenerator  # noqa: E402

from mlx_qwenmoe import load, stream_generate  # noqa: E402
from mlx_qwenmoe.api import chat_prompt_with_boundaries  # noqa: E402
from mlx_qwenmoe.prompt_cache import PromptCache  # noqa: E402

TEMPLATE = (
    "{%- set ns = namespace(last_user=-1) %}"
    "{%- for m in messages %}{%- if m.role == 'user' %}{%- set ns.last_user = loop.index0 %}{%- endif %}{%- endfor %}"
    "{%- if messages[0].role == 'system' or tools %}{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0].role == 'system' %}{{- messages[0].content }}{%- endif %}"
    "{%- if tools %}{{- '\\n\\n# Tools\\n<tools>' }}{%- for t in tools %}{{- '\\n' + (t | tojson) }}{%- endfor %}"
    "{{- '\\n</tools>' }}{%- endif %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'user' %}{{- '<|im_start|>user\\n' + m.content + '<|im_end|>\\n' }}"
    "{%- elif m.role == 'assistant' %}{%- set c = m.content %}"
    "{%- if loop.index0 < ns.last_user and '</think>' in c %}{%- set c = c.split('</think>')[-1].lstrip('\\n') %}{%- endif %}"
    "{{- '<|im_start|>assistant\\n' + c + '<|im_end|>\\n' }}"
    "{%- elif m.role == 'tool' %}{{- '<|im_start|>user\\n<tool_response>\\n' + m.content + '\\n</tool_response><|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n<think>\\n' }}{%- endif %}"
)
TOOLS = [
    {"type": "function", "function": {"name": name, "description": f"{name} a file in the repository",
     "parameters": {"type": "object", "properties": {"path": {"type": "string"}, "text": {"type": "string"}}}}}
    for name in ("read", "write", "grep", "run_tests", "list_dir", "git_diff")
]


@dataclass
class Request:
    messages: List[Dict[str, str]]
    reply: str  # the assistant's answer: "<reasoning>\n</think>\n\n<answer>"
    tools: Any = None


def _lines(kind: str, n: int, start: int = 0) -> str:
    if kind == "rules":
        return "".join(f"Rule {i}: when you change src/module_{i % 37}.py keep its public API stable, add a test in tests/test_{i % 37}.py and explain the change in one line.\n" for i in range(start, start + n))
    return "".join(f"def handler_{i}(request, config):\n    value = config.get('key_{i}', {i})\n    return request.reply(value * {i % 7 + 1})\n\n" for i in range(start, start + n))


def _reply(i: int, answer: str) -> str:
    return f"The user wants step {i}; I check the files first.\n</think>\n\n{answer}"


def _chat(history: List[Dict[str, str]], user: str, reply: str, tools: Any = None) -> Request:
    """Appends the user turn, returns its request, then appends the reply to ``history``."""
    history.append({"role": "user", "content": user})
    request = Request(list(history), reply, tools)
    history.append({"role": "assistant", "content": "<think>\n" + reply})
    return request


def transcripts() -> Dict[str, List[Request]]:
    out: Dict[str, List[Request]] = {}
    system = "You are a coding agent working in a Python repository.\n" + _lines("rules", 52)  # ~2K tokens
    # 1. Agent with tools and thinking: 10 requests, tool results inside a task, a new task every third.
    h = [{"role": "system", "content": system}]
    agent = []
    for i in range(10):
        if i % 3 == 0:
            agent.append(_chat(h, f"Task {i}: make handler_{i} return a string and keep the tests green.", _reply(i, f'<tool_call>{{"name": "read", "arguments": {{"path": "src/module_{i}.py"}}}}</tool_call>'), TOOLS))
        else:
            h.append({"role": "tool", "content": _lines("code", 3, i)})
            agent.append(Request(list(h), _reply(i, f'<tool_call>{{"name": "write", "arguments": {{"path": "src/module_{i}.py", "text": "x = {i}"}}}}</tool_call>'), TOOLS))
            h.append({"role": "assistant", "content": "<think>\n" + agent[-1].reply})
    out["agent"] = agent
    # 2. An edited earlier message: four turns, then the second user message is rewritten.
    h = [{"role": "system", "content": "You are a helpful assistant."}]
    edited = [_chat(h, f"Question {i}: " + _lines("rules", 4, 10 * i), _reply(i, f"Answer {i}: yes.")) for i in range(4)]
    rewritten = [dict(m) for m in edited[-1].messages]
    rewritten[3]["content"] = "Question 1, asked better: " + _lines("rules", 4, 500)
    edited.append(Request(rewritten, _reply(9, "Answer: no.")))
    out["edited"] = edited
    # 3. Three conversations sharing the system prompt, interleaved, two turns each.
    convs = [[{"role": "system", "content": system}] for _ in range(3)]
    out["shared-system"] = [_chat(convs[c], f"Conversation {c}, turn {t}: explain handler_{c * 10 + t}.", _reply(t, f"It returns {c}.")) for t in range(2) for c in range(3)]
    # 4. A long document, then questions about it in the same conversation.
    h = [{"role": "system", "content": "Answer questions about the code below."}]
    doc = _lines("code", 60)  # ~2.5K tokens
    out["document-qa"] = [_chat(h, (doc if i == 0 else "") + f"Question {i}: what does handler_{i * 7} return?", _reply(i, f"It returns value times {i}.")) for i in range(5)]
    # 5. A system prompt whose last line changes every request (time, git status).
    h = [{"role": "system", "content": ""}]
    stamped = []
    for i in range(6):
        h[0] = {"role": "system", "content": system[:3000] + f"Current time: 2026-12-02 10:4{i}:0{i}. git status: M src/module_{i}.py"}
        stamped.append(_chat(h, f"Step {i}: continue the refactoring.", _reply(i, f"Done step {i}.")))
    out["changing-system-line"] = stamped
    # 6. One long document in several new conversations, the question in the same user message.
    out["document-new-conversations"] = [_chat([], doc + f"\nQuestion: what does handler_{i * 11} do?", _reply(i, "It scales a config value.")) for i in range(5)]
    # 7. A long pasted file edited near its middle and sent again (a fresh request each time).
    versions = [doc, doc.replace("handler_30(", "handler_30_renamed("), doc.replace("handler_45(", "handler_45_v2(")]
    out["file-edited-mid"] = [_chat([], "Review this file:\n" + v + "\nList the problems.", _reply(i, "No problems.")) for i, v in enumerate(versions)]
    return out


class SizedEntry(_BaseCache):
    """A stand-in for one cached sequence in mlx-lm's LRUPromptCache: its byte size, not trimmable
    (a hybrid model's caches are not, in mlx-lm)."""

    def __init__(self, nbytes: int):
        self._nbytes = nbytes

    @property
    def nbytes(self) -> int:
        return self._nbytes


def cache_bytes(pc: PromptCache, n: int) -> int:
    """Bytes our model's caches hold for an n-token sequence: KV of exactly n tokens and every DeltaNet state."""
    return pc.kv_bytes_per_token * n + pc.state_bytes


def forced(tokens: List[int]):
    """A sampler that returns the scripted reply token by token (then repeats the last)."""
    queue = list(tokens)

    def sample(_logprobs: mx.array) -> mx.array:
        return mx.array([queue.pop(0) if len(queue) > 1 else queue[0]], dtype=mx.uint32)

    return sample


class MlxLmServerFeed:
    """LRUPromptCache driven as mlx_lm.server's batch path drives it."""

    def __init__(self, tokenizer: Any, pc: PromptCache):
        self.tokenizer, self.pc = tokenizer, pc
        self.lru = LRUPromptCache()  # the server's default: --prompt-cache-size 10, no byte limit
        provider = SimpleNamespace(processor=None, cli_args=SimpleNamespace(chat_template_args={"chat_template": TEMPLATE}))
        self.server = SimpleNamespace(model_provider=provider)

    def request(self, req: Request, reply_ids: List[int]) -> Tuple[int, int]:
        """Returns (prompt tokens, prompt tokens computed)."""
        request = SimpleNamespace(request_type="chat", messages=req.messages, tools=req.tools, role_mapping=None)
        args = SimpleNamespace(chat_template_kwargs=None)
        prompt, segments, types, _, _ = ResponseGenerator._tokenize(self.server, self.tokenizer, request, args)
        _, rest = self.lru.fetch_nearest_cache("model", prompt)
        n = len(prompt) - len(rest)
        while n > 0:  # as the server: drop the segments the cache covers
            if n >= len(segments[0]):
                n -= len(segments.pop(0))
                types.pop(0)
            else:
                segments[0] = segments[0][n:]
                break
        end = len(prompt) - len(rest)
        for seg, kind in list(zip(segments, types))[:-1]:  # a cache at each segment end inside the prompt
            end += len(seg)
            self.lru.insert_cache("model", prompt[:end], [SizedEntry(cache_bytes(self.pc, end))], cache_type=kind)
        held = prompt + reply_ids[:-1]  # the last generated token is not in the cache
        self.lru.insert_cache("model", held, [SizedEntry(cache_bytes(self.pc, len(held)))], cache_type="assistant")
        return len(prompt), len(rest)


def ours(model: Any, tokenizer: Any, pc: PromptCache, req: Request, reply_ids: List[int]) -> Dict[str, float]:
    ids, boundaries = chat_prompt_with_boundaries(tokenizer, req.messages, tools=req.tools, chat_template=TEMPLATE)
    wall, cpu = time.perf_counter(), time.process_time()
    ttft = None
    for r in stream_generate(model, tokenizer, ids, max_tokens=len(reply_ids), sampler=forced(reply_ids), prompt_cache=pc, boundaries=boundaries):
        if ttft is None:
            ttft = (time.perf_counter() - wall, time.process_time() - cpu, r.cached_tokens)
    assert pc.nbytes <= pc.max_bytes, (pc.nbytes, pc.max_bytes)
    return dict(prompt=len(ids), computed=len(ids) - ttft[2], wall=ttft[0], cpu=ttft[1], bytes=pc.nbytes)


def replay(name: str, requests: Sequence[Request], model: Any, tokenizer: Any, budget: int, interval: int) -> List[Dict[str, Any]]:
    pc = PromptCache(model, max_bytes=budget, checkpoint_interval=interval)
    feed = MlxLmServerFeed(tokenizer, pc)
    rows = []
    for i, req in enumerate(requests):
        reply_ids = tokenizer.encode(req.reply, add_special_tokens=False) + [tokenizer.convert_tokens_to_ids("<|im_end|>")]
        o = ours(model, tokenizer, pc, req, reply_ids)
        prompt, theirs = feed.request(req, reply_ids)
        assert prompt == o["prompt"], (name, i, prompt, o["prompt"])
        rows.append(dict(o, mlx_computed=theirs, mlx_bytes=feed.lru.nbytes))
        print(f"  {name} #{i}: prompt {prompt}, computed ours {o['computed']} / mlx-lm {theirs}, bytes ours {o['bytes']} / mlx-lm {feed.lru.nbytes}, TTFT ours {o['cpu']:.2f} CPU-s", file=sys.stderr, flush=True)
    return rows


def report(results: Dict[str, List[Dict[str, Any]]], detail: bool) -> None:
    """The per-transcript table. mlx-lm's time to first token is estimated with a least-squares
    line (CPU seconds against tokens computed) through all of our requests."""
    rows_all = [r for rows in results.values() for r in rows]
    slope, intercept = np.polyfit([r["computed"] for r in rows_all], [r["cpu"] for r in rows_all], 1)
    print(f"time to first token, ours, fitted: {intercept:.3f} CPU-s + {slope * 1e3:.2f} CPU-ms per computed token\n")
    summary = []
    for n, rows in results.items():
        later = rows[1:]
        ours_later, theirs_later = sum(r["computed"] for r in later), sum(r["mlx_computed"] for r in later)
        summary.append([
            n, len(rows), sum(r["prompt"] for r in rows), rows[0]["computed"], ours_later, theirs_later,
            f"{ours_later / max(theirs_later, 1):.2f}", sum(r["computed"] > r["mlx_computed"] for r in rows),
            f"{max(r['bytes'] for r in rows) / 2**20:.1f}", f"{max(r['mlx_bytes'] for r in rows) / 2**20:.1f}",
            f"{sum(r['cpu'] for r in later) / len(later):.2f}",
            f"{sum(intercept + slope * r['mlx_computed'] for r in later) / len(later):.2f}",
        ])
    print(C.table(
        ["transcript", "requests", "prompt tokens", "1st request computed", "later computed: ours", "mlx-lm", "ours/mlx-lm",
         "requests where ours > mlx-lm", "peak MiB: ours", "mlx-lm", "later TTFT CPU-s: ours", "mlx-lm (est.)"],
        summary,
    ))
    ours_total, theirs_total = (sum(row[i] for row in summary) for i in (4, 5))
    print(f"\nlater requests, all transcripts: ours {ours_total} tokens computed, mlx-lm {theirs_total}: "
          f"ratio {ours_total / max(theirs_total, 1):.3f}")
    if detail:
        print()
        print(C.table(
            ["transcript", "#", "prompt", "computed: ours", "mlx-lm", "bytes: ours", "mlx-lm", "TTFT wall s", "TTFT CPU-s"],
            [[n, i, r["prompt"], r["computed"], r["mlx_computed"], r["bytes"], r["mlx_bytes"], f"{r['wall']:.2f}", f"{r['cpu']:.2f}"]
             for n, rows in results.items() for i, r in enumerate(rows)],
        ))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", default=None, help="comma-separated transcript names")
    parser.add_argument("--interval", type=int, default=None, help="checkpoint_interval [default: the model's]")
    parser.add_argument("--budget-mib", type=int, default=64, help="our cache's byte budget, MiB")
    parser.add_argument("--detail", action="store_true", help="also print one row per request")
    parser.add_argument("--save", default=None, help="also write the per-request rows to this JSON file")
    parser.add_argument("--combine", nargs="+", default=None, help="print the table of JSON files from --save runs")
    args = parser.parse_args()
    if args.combine:
        results = {n: rows for path in args.combine for n, rows in json.loads(Path(path).read_text()).items()}
        report(results, args.detail)
        return
    print(C.machine_report())
    model, tokenizer = load()
    all_transcripts = transcripts()
    names = args.only.split(",") if args.only else list(all_transcripts)
    budget = args.budget_mib << 20
    interval = PromptCache(model, budget, args.interval).checkpoint_interval
    print(f"demo model, checkpoint_interval {interval}, our budget {args.budget_mib} MiB", file=sys.stderr)
    results = {n: replay(n, all_transcripts[n], model, tokenizer, budget, interval) for n in names}
    if args.save:
        Path(args.save).parent.mkdir(parents=True, exist_ok=True)
        Path(args.save).write_text(json.dumps(results))
    print(f"\ndemo model, checkpoint_interval {interval}, our budget {args.budget_mib} MiB")
    report(results, args.detail)


if __name__ == "__main__":
    main()
