"""Load test of ``mlx_qwenmoe serve`` and ``mlx_lm.server`` on the same weights (loopback only).

Both servers run at once, each its own process on the bundled demo model (an idle one uses
no CPU), and each concurrency level (1, 2, 4, 8) runs on one, then the other, so a shared
machine's load changes hit both alike. A level is a fixed number of streaming greedy chat
requests (distinct prompts, the official ``openai`` client, one thread per concurrent
client) run to completion; it reports aggregate generated tok/s (all tokens over the level's
wall time), tokens per CPU-second of the server process (steadier on a loaded machine), p50/p95
time to first token and inter-token latency, and errors. The server's RSS after each level and
its peak (VmHWM) come from /proc. Bounded: ``--requests`` per level, ``--max-tokens`` each, and
``--max-seconds`` in all, after which remaining levels are skipped (and said so).

    python benchmarks/bench_server.py [--requests 8] [--max-tokens 32] [--max-seconds 120] [--only ours|mlx-lm]
"""

from __future__ import annotations

import common  # noqa: F401  isort: skip

import argparse
import concurrent.futures
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Dict, List

import openai

from mlx_qwenmoe.api import default_model_dir

LEVELS = (1, 2, 4, 8)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(name: str, log_dir: Path) -> tuple:
    port = _free_port()
    model_dir = str(default_model_dir())
    if name == "ours":
        cmd = [sys.executable, "-m", "mlx_qwenmoe", "serve", "--port", str(port), "--max-batch", "8"]
    else:
        cmd = [sys.executable, "-m", "mlx_lm.server", "--model", model_dir, "--port", str(port)]
    log_path = log_dir / f"{name}.log"
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        try:
            with urllib.request.urlopen(base + "/health", timeout=5):
                return proc, base, log_path
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"{name} server did not start:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.3)


def _cpu_seconds(pid: int) -> float:
    """User plus system CPU time of the process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _one(client: openai.OpenAI, prompt: str, max_tokens: int) -> Dict[str, object]:
    """TTFT, inter-token gaps and generated tokens of one streamed greedy chat request."""
    tic = time.perf_counter()
    arrivals: List[float] = []
    usage = None
    stream = client.chat.completions.create(
        model="default_model", messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
        temperature=0, stream=True, stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.choices:
            delta = chunk.choices[0].delta
            if delta.content or getattr(delta, "reasoning_content", None):
                arrivals.append(time.perf_counter())
        if chunk.usage is not None:
            usage = chunk.usage
    tokens = usage.completion_tokens if usage is not None else len(arrivals)
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    return {"ttft": arrivals[0] - tic if arrivals else None, "gaps": gaps, "tokens": tokens}


def _pct(values: List[float], q: float) -> str:
    if not values:
        return "-"
    values = sorted(values)
    return f"{values[min(len(values) - 1, int(q * len(values)))] * 1000:.0f}"


def _level(base: str, concurrency: int, requests: int, max_tokens: int, offset: int) -> Dict[str, object]:
    client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=300)
    prompts = [f"def function_{offset + i}(values):" + " # step" * (i % 5) for i in range(requests)]
    results, errors = [], 0
    tic = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        for future in [pool.submit(_one, client, p, max_tokens) for p in prompts]:
            try:
                results.append(future.result())
            except Exception as e:  # noqa: BLE001  an error is a result of the load test
                errors += 1
                print(f"  request failed: {e!r}", file=sys.stderr)
    wall = time.perf_counter() - tic
    tokens = sum(r["tokens"] for r in results)
    ttfts = [r["ttft"] for r in results if r["ttft"] is not None]
    gaps = [g for r in results for g in r["gaps"]]
    return {"tok/s": tokens / wall, "tokens": tokens, "wall": wall, "ttft": ttfts, "itl": gaps, "errors": errors}


def _row(name: str, proc: subprocess.Popen, base: str, concurrency: int, args: argparse.Namespace, warm_kib: int) -> list:
    cpu = _cpu_seconds(proc.pid)
    r = _level(base, concurrency, args.requests, args.max_tokens, 100 * concurrency)
    cpu = _cpu_seconds(proc.pid) - cpu
    return [
        name, concurrency, f"{r['tok/s']:.1f}", f"{r['tokens'] / max(cpu, 1e-9):.1f}", r["tokens"], f"{r['wall']:.1f}",
        _pct(r["ttft"], 0.5), _pct(r["ttft"], 0.95), _pct(r["itl"], 0.5), _pct(r["itl"], 0.95),
        f"{_rss_kib(proc.pid, 'VmRSS') / 1024:.0f} (warm {warm_kib / 1024:.0f}, peak "
        f"{_rss_kib(proc.pid, 'VmHWM') / 1024:.0f})", r["errors"],
    ]


def _load_test(names: List[str], args: argparse.Namespace, log_dir: Path) -> List[List[object]]:
    servers, rows = {}, []
    try:
        for name in names:
            try:
                servers[name] = _start(name, log_dir)
            except RuntimeError as e:
                rows.append([name, "-", f"did not run: {str(e).splitlines()[0]}"] + ["-"] * 9)
                print(e, file=sys.stderr)
        warm = {}
        for name, (proc, base, _) in servers.items():
            _level(base, 1, 1, 4, 10_000)  # warm-up: first-call compilation and allocations
            warm[name] = _rss_kib(proc.pid, "VmRSS")
        start = time.monotonic()
        for concurrency in LEVELS:
            for name, (proc, base, _) in servers.items():
                if time.monotonic() - start > args.max_seconds:
                    rows.append([name, concurrency, "skipped: --max-seconds reached"] + ["-"] * 9)
                else:
                    rows.append(_row(name, proc, base, concurrency, args, warm[name]))
    finally:
        for name, (proc, _, log_path) in servers.items():
            proc.terminate()
            proc.wait(timeout=30)
            print(f"{name}: log in {log_path}", file=sys.stderr)
    return sorted(rows, key=lambda row: row[0] != "ours")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=8, help="requests per concurrency level")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-seconds", type=float, default=120, help="time budget for the levels")
    parser.add_argument("--only", choices=("ours", "mlx-lm"), default=None)
    args = parser.parse_args()
    print(common.machine_report())
    log_dir = Path(tempfile.mkdtemp(prefix="bench_server_"))
    names = [n for n in ("ours", "mlx-lm") if args.only in (None, n)]
    rows = _load_test(names, args, log_dir)
    print(common.table(
        ["server", "concurrency", "aggregate tok/s", "tok/server-CPU-s", "tokens", "wall s", "TTFT p50 ms", "TTFT p95 ms", "ITL p50 ms",
         "ITL p95 ms", "RSS MiB after level", "errors"], rows,
    ))


if __name__ == "__main__":
    main()
