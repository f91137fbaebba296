"""Time to first token of a conversation's second turn through ``mlx_qwenmoe serve``.

A client with a long system prompt (the demo model's 4 KB held-out sample) asks a first
question, then a second one with the first answer in the history; the second turn's time
to first token (first streamed text, not the role chunk) is what a prompt cache cuts.
The server runs in this process (uvicorn on a thread), on the bundled demo model, driven
with the official ``openai`` client over HTTP: once without a prompt cache (cold, every turn
prefilled from scratch) and once with one, as ``mlx_qwenmoe serve`` runs.

    python benchmarks/bench_serve_ttft.py [--repeats 5] [--mtp]
"""

from __future__ import annotations

import common  # noqa: F401  isort: skip  (the package may preload an optimised BLAS)

import argparse
import socket
import statistics
import threading
import time

import openai
import uvicorn

from mlx_qwenmoe.api import default_model_dir, load
from mlx_qwenmoe.prompt_cache import PromptCache
from mlx_qwenmoe.server import Backend, ServerConfig, create_app, sampling_defaults


def _start_server(model, tokenizer, mtp: bool, prompt_cache) -> tuple:
    model_dir = default_model_dir()
    config = ServerConfig("default_model", model.args.max_position_embeddings, model.args.vocab_size,
                          sampling_defaults(model_dir))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(Backend(model, tokenizer, mtp=mtp, prompt_cache=prompt_cache), config),
                                           host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    return server, thread, f"http://127.0.0.1:{port}/v1"


def _ttft(client: openai.OpenAI, messages: list) -> tuple:
    """(wall seconds, this process's CPU seconds to the first streamed text, usage) of one
    streamed greedy turn. The server runs in this process, so its CPU time counts; on a
    shared machine that figure moves far less with the load than the wall time."""
    tic, cpu_tic = time.perf_counter(), time.process_time()
    first = cpu = None
    usage = None
    for chunk in client.chat.completions.create(model="default_model", messages=messages, max_tokens=16, temperature=0,
                                                stream=True, stream_options={"include_usage": True}):
        if chunk.choices:
            delta = chunk.choices[0].delta
            if first is None and (delta.content or getattr(delta, "reasoning_content", None)):
                first, cpu = time.perf_counter() - tic, time.process_time() - cpu_tic
        if chunk.usage is not None:
            usage = chunk.usage
    return first, cpu, usage


def _second_turns(base_url: str, repeats: int) -> tuple:
    """(TTFT wall seconds, CPU seconds, last usage) of ``repeats`` second turns, each after its first."""
    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0)
    system = (default_model_dir() / "heldout_sample.txt").read_text()
    first_turn = [{"role": "system", "content": system}, {"role": "user", "content": "def parse(self, text):"}]
    answer = client.chat.completions.create(model="default_model", messages=first_turn, max_tokens=32, temperature=0)
    second_turn = first_turn + [
        {"role": "assistant", "content": answer.choices[0].message.content or ""},
        {"role": "user", "content": "def close(self):"},
    ]
    times, cpu_times, usage = [], [], None
    for _ in range(repeats):
        client.chat.completions.create(model="default_model", messages=first_turn, max_tokens=32, temperature=0)
        seconds, cpu, usage = _ttft(client, second_turn)
        times.append(seconds)
        cpu_times.append(cpu)
    return times, cpu_times, usage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--mtp", action="store_true", help="serve with MTP speculative decoding")
    args = parser.parse_args()
    print(common.machine_report())
    model, tokenizer = load(default_model_dir())
    rows = []
    for name, prompt_cache in (("cold (no prompt cache)", None), ("prompt cache", PromptCache(model))):
        server, thread, base_url = _start_server(model, tokenizer, args.mtp, prompt_cache)
        times, cpu_times, usage = _second_turns(base_url, args.repeats)
        server.should_exit = True
        thread.join()
        rows.append([name, usage.prompt_tokens, usage.prompt_tokens_details.cached_tokens,
                     f"{statistics.median(times):.3f}", f"{min(times):.3f}", f"{statistics.median(cpu_times):.3f}",
                     len(times)])
    print(common.table(
        ["server", "turn 2 prompt tokens", "cached tokens", "TTFT median (s)", "TTFT min (s)", "TTFT CPU-s median",
         "runs"], rows,
    ))


if __name__ == "__main__":
    main()
