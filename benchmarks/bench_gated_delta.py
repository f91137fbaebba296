"""Delta-rule prefill on the CPU: our chunked ops path against mlx-lm's per-token loop.

Times ``mlx_qwenmoe.ops.gated_delta.gated_delta_update`` (L2 norm, decay/beta and the
chunked WY/UT form) and ``mlx_lm.models.gated_delta.gated_delta_update`` (decay/beta
and its per-token ops loop) on the same inputs with the real head shapes (B=1,
Hk=16, Hv=32, Dk=Dv=128), one DeltaNet layer. Prints wall and process CPU seconds
(CPU time is the steadier number on a shared machine) and both ratios. mlx-lm's side
runs in pieces of 2048 tokens carrying the state, as its generate() prefills
(prefill_step_size 2048): one 8192-token call of its loop holds every step's state
alive and was OOM-killed at 11 GB here.

    python benchmarks/bench_gated_delta.py [--lengths 512 2048 8192]

``import mlx_qwenmoe`` loads the system OpenBLAS on Linux (MLX_QWENMOE_NO_OPENBLAS=1
to compare with the wheel's reference BLAS). OpenBLAS is held to one thread unless
OPENBLAS_NUM_THREADS is set, so both sides use one core (MLX's CPU backend runs on one
worker thread) and the numbers hold on a shared machine, where idle OpenBLAS threads
spin on cores others need.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import time
from typing import Callable, Tuple

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # read when OpenBLAS loads, below

import mlx_qwenmoe  # noqa: E402,F401  (first: loads OpenBLAS before mlx.core)
import mlx.core as mx  # noqa: E402
from mlx_lm.models import gated_delta as mlx_lm_gd  # noqa: E402

from mlx_qwenmoe.ops.gated_delta import gated_delta_update, l2_normalize_qk  # noqa: E402

B, HK, HV, DK, DV = 1, 16, 32, 128, 128
MLX_LM_STEP = 2048  # mlx-lm generate()'s default prefill_step_size


def inputs(T: int) -> Tuple[mx.array, ...]:
    mx.random.seed(0)
    q = mx.random.normal((B, T, HK, DK))
    k = mx.random.normal((B, T, HK, DK))
    v = mx.random.normal((B, T, HV, DV))
    a = mx.random.normal((B, T, HV))
    b = mx.random.normal((B, T, HV))
    A_log = mx.random.uniform(-1.0, 1.5, (HV,))
    dt_bias = mx.random.uniform(0.0, 1.0, (HV,))
    state = mx.zeros((B, HV, DV, DK), dtype=mx.float32)
    mx.eval(q, k, v, a, b, A_log, dt_bias, state)
    return q, k, v, a, b, A_log, dt_bias, state


def timed(fn: Callable[[], Tuple[mx.array, mx.array]], reps: int) -> Tuple[float, float]:
    """Best wall and CPU seconds over reps runs (after one warm-up when reps > 1)."""
    if reps > 1:
        mx.eval(*fn())
    best_wall = best_cpu = float("inf")
    for _ in range(reps):
        w0, c0 = time.perf_counter(), time.process_time()
        mx.eval(*fn())
        best_wall = min(best_wall, time.perf_counter() - w0)
        best_cpu = min(best_cpu, time.process_time() - c0)
    return best_wall, best_cpu


def mlx_lm_prefill(q, k, v, a, b, A_log, dt_bias, state) -> Tuple[mx.array, mx.array]:
    ys = []
    for s in range(0, q.shape[1], MLX_LM_STEP):
        e = s + MLX_LM_STEP
        y, state = mlx_lm_gd.gated_delta_update(
            q[:, s:e], k[:, s:e], v[:, s:e], a[:, s:e], b[:, s:e], A_log, dt_bias, state, use_kernel=False
        )
        mx.eval(y, state)
        ys.append(y)
    return mx.concatenate(ys, axis=1), state


def openblas_loaded() -> bool:
    try:
        with open("/proc/self/maps") as f:
            return "libopenblas" in f.read()
    except OSError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192])
    args = parser.parse_args()
    mx.set_default_device(mx.cpu)

    print(f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.machine()}, "
          f"{os.cpu_count()} cores, mlx {mx.__version__}, OpenBLAS loaded: {openblas_loaded()} "
          f"(threads {os.environ['OPENBLAS_NUM_THREADS']}), "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"B={B} Hk={HK} Hv={HV} Dk={DK} Dv={DV}, one layer, float32 inputs")
    print()
    print("| T | ours wall s | ours CPU s | mlx-lm wall s | mlx-lm CPU s | speed-up wall | speed-up CPU |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for T in args.lengths:
        q, k, v, a, b, A_log, dt_bias, state = inputs(T)
        ours = timed(lambda: gated_delta_update(q, k, v, a, b, A_log, dt_bias, state), 3 if T <= 2048 else 1)
        qn, kn = l2_normalize_qk(q, k)
        mx.eval(qn, kn)
        theirs = timed(lambda: mlx_lm_prefill(qn, kn, v, a, b, A_log, dt_bias, state), 2 if T <= 512 else 1)
        print(f"| {T} | {ours[0]:.3f} | {ours[1]:.3f} | {theirs[0]:.2f} | {theirs[1]:.2f} "
              f"| {theirs[0] / ours[0]:.1f}x | {theirs[1] / ours[1]:.1f}x |",
              flush=True)


if __name__ == "__main__":
    main()
