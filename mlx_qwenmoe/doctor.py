"""``mlx_qwenmoe doctor``: are the Metal kernels right on this machine, and are they faster?

On Metal every kernel is built and checked against its pure-MLX twin at
Qwen3.5-35B-A3B shapes (the same checks as the runtime safety net), then timed
against the ops path, ``mx.fast.gated_delta_update`` (MLX >= 0.32) and mlx-lm's
own code on the same inputs. Off Metal the kernels cannot run; from a source
checkout it runs them in the MSL emulator (``tests/metal_emu``, small shapes) and
runs the Metal-rules syntax check (``tests/msl_check``, needs clang) instead.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Dict, Iterator, List, Optional

import mlx.core as mx
import mlx.nn as nn

from . import kernels
from .model import SparseMoeBlock
from .ops import gated_delta as gd
from .ops.gated_delta import check as gd_check
from .ops.gated_delta import kernel as gd_kernel
from .ops.moe import check as moe_check
from .ops.moe import kernel as moe_kernel
from .ops.moe import reference as moe_reference

TESTS_DIR = Path(__file__).resolve().parent.parent / "tests"


@dataclass(frozen=True)
class Shapes:
    """The sizes a kernel check runs at (also the syntax check's cases, ``tests/msl_check``)."""

    name: str
    dtype: mx.Dtype  # activations; also the quantization scales' dtype
    hidden: int
    experts: int
    top_k: int
    inter: int  # expert intermediate
    shared_inter: int  # 0: no shared expert
    bits: int
    group_size: int
    hk: int
    hv: int
    dk: int
    dv: int
    prefill: int  # tokens of the chunked delta-rule call
    tokens: int = 1  # a decode-sized MoE call


A3B = Shapes("Qwen3.5-35B-A3B", mx.bfloat16, 2048, 256, 8, 512, 512, 4, 64, 16, 32, 128, 128, 512)
SMALL = Shapes("small", mx.float32, 128, 8, 2, 128, 128, 4, 64, 2, 4, 32, 32, gd_check.CHECK_T)


@dataclass
class Row:
    kernel: str
    check: str  # "ok", "FAIL: reason", or what was skipped
    ms: Dict[str, Optional[float]] = field(default_factory=dict)  # per path; None: not available


def on_metal() -> bool:
    return mx.metal.is_available()


def environment() -> Dict[str, str]:
    def version(dist: str) -> str:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return "-"

    chip = mx.metal.device_info().get("device_name", "?") if on_metal() else f"{platform.machine()} (no Metal)"
    return {
        "mlx_qwenmoe": version("mlx_qwenmoe"), "mlx": mx.__version__, "mlx-lm": version("mlx-lm"),
        "python": platform.python_version(), "os": platform.platform(), "chip": str(chip),
    }


def _run_check(fn: Callable[[], None]) -> str:
    try:
        fn()
    except (RuntimeError, ValueError) as e:
        return "FAIL: " + (str(e).strip().splitlines() or [type(e).__name__])[0]
    return "ok"


def _times(repeats: int, **paths: Optional[Callable[[], object]]) -> Dict[str, Optional[float]]:
    """Median milliseconds per path (None where the path is missing or fails); {} when not timing."""
    if not repeats:
        return {}
    return {name: None if fn is None else _median_ms(fn, repeats) for name, fn in paths.items()}


def _median_ms(fn: Callable[[], object], repeats: int) -> Optional[float]:
    try:
        mx.eval(fn())
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            mx.eval(fn())
            times.append(1e3 * (time.perf_counter() - t0))
    except (RuntimeError, ValueError, TypeError):
        return None
    return sorted(times)[len(times) // 2]


def _random_quantized(module: nn.Module, dtype: mx.Dtype) -> None:
    """Random codes, scales and biases in every quantized layer, made directly at their shapes."""
    for _, layer in module.named_modules():
        if hasattr(layer, "scales"):
            halves = [mx.random.randint(0, 1 << 16, layer.weight.shape, dtype=mx.uint32) for _ in range(2)]
            layer.weight = (halves[0] << 16) | halves[1]
            layer.scales = mx.random.uniform(0.002, 0.02, layer.scales.shape).astype(dtype)
            layer.biases = (-(2 ** (layer.bits - 1)) * layer.scales).astype(dtype)


def _moe_args(s: Shapes) -> SimpleNamespace:
    """What both our SparseMoeBlock and mlx-lm's Qwen3NextSparseMoeBlock read from the config."""
    return SimpleNamespace(
        hidden_size=s.hidden, num_experts=s.experts, num_experts_per_tok=s.top_k, norm_topk_prob=True,
        moe_intermediate_size=s.inter, shared_expert_intermediate_size=s.shared_inter,
    )


def _moe_block(s: Shapes) -> SparseMoeBlock:
    block = SparseMoeBlock(_moe_args(s))
    nn.quantize(block, class_predicate=lambda p, m: hasattr(m, "to_quantized") and {
        "bits": 8 if p.endswith("gate") else s.bits, "group_size": 64 if p.endswith("gate") else s.group_size})
    _random_quantized(block, s.dtype)
    mx.eval(block.parameters())
    return block


@contextlib.contextmanager
def _ops_only() -> Iterator[None]:
    """The dispatchers' ops path, whatever the device."""
    saved = kernels.use_metal, gd.use_metal
    kernels.use_metal = gd.use_metal = lambda: False
    try:
        yield
    finally:
        kernels.use_metal, gd.use_metal = saved


def _timed_ops(fn: Callable[[], object]) -> Callable[[], object]:
    def run():
        with _ops_only():
            return fn()

    return run


def moe_rows(s: Shapes, repeats: int) -> List[Row]:
    """Router, experts and the whole MoE layer (ours, ops, mlx-lm's block on the same weights)."""
    from mlx_lm.models.qwen3_next import Qwen3NextSparseMoeBlock

    block = _moe_block(s)
    x = moe_check.sample_input(1, s.hidden, s.dtype)
    logits = moe_check.router_logits(1, s.experts, s.top_k, s.dtype)
    parts = (block.switch_mlp, block.shared_expert, block.shared_expert_gate)
    weights, inds = moe_reference.route(logits, s.top_k, True)
    theirs = Qwen3NextSparseMoeBlock(_moe_args(s))  # its own weights are never evaluated: ours replace them
    theirs.gate, theirs.switch_mlp, theirs.shared_expert, theirs.shared_expert_gate = block.gate, *parts
    rows = [
        Row(moe_check.ROUTER, _run_check(lambda: moe_check.check_route(logits, s.top_k, True)), _times(
            repeats, ours=lambda: moe_kernel.route(logits, s.top_k, True),
            ops=lambda: moe_reference.route(logits, s.top_k, True))),
        Row(moe_check.EXPERTS, _run_check(lambda: moe_check.check_experts(x, s.top_k, *parts)), _times(
            repeats, ours=lambda: moe_kernel.routed_experts(x, inds, weights, *parts),
            ops=lambda: moe_reference.routed_experts(x, inds, weights, *parts))),
    ]
    if repeats:
        rows.append(Row("moe layer (gate, router, experts)", "-", _times(
            repeats, ours=lambda: block(x[None]), ops=_timed_ops(lambda: block(x[None])),
            **{"mlx-lm": lambda: theirs(x[None])})))
    return rows


def _mx_fast_delta(q, k, v, a, b, A_log, dt_bias, state):
    qn, kn = gd.l2_normalize_qk(q, k)
    g, beta = gd.decay_and_beta(a, b, A_log, dt_bias)
    return mx.fast.gated_delta_update(qn, kn, v, mx.exp(g), beta, state)


def delta_rows(s: Shapes, repeats: int) -> List[Row]:
    """Decode step and chunked prefill: ours, ops, mx.fast.gated_delta_update, mlx-lm's gated_delta_update."""
    from mlx_lm.models.gated_delta import gated_delta_update as mlx_lm_delta

    def like(T: int) -> list:
        shapes = (
            mx.zeros((1, 1, s.hk, s.dk), s.dtype), mx.zeros((1, 1, s.hk, s.dk), s.dtype),
            mx.zeros((1, 1, s.hv, s.dv), s.dtype), mx.zeros((1, 1, s.hv), s.dtype), mx.zeros((1, 1, s.hv), s.dtype),
            mx.zeros((s.hv,), mx.float32), mx.zeros((s.hv,), mx.float32), mx.zeros((1, s.hv, s.dv, s.dk)),
        )
        return gd_check.sample_like(shapes, T)

    def chunked_kernel(q, k, v, a, b, A_log, dt_bias, state):
        qn, kn = gd.l2_normalize_qk(q, k)
        g, beta = gd.decay_and_beta(a, b, A_log, dt_bias)
        return gd_kernel.chunked(qn, kn, v, g, beta, state)

    rows = []
    for label, check_fn, kernel_fn, T_check, T_time in (
        (gd_check.DECODE, gd_check.check_decode, gd_kernel.decode_step, 1, 1),
        (gd_check.CHUNKED, gd_check.check_chunked, chunked_kernel, gd_check.CHECK_T, s.prefill),
    ):
        args = like(T_time)
        ms = _times(
            repeats, ours=lambda: kernel_fn(*args), ops=_timed_ops(lambda: gd.gated_delta_update(*args)),
            **{"mx.fast": (lambda: _mx_fast_delta(*args)) if hasattr(mx.fast, "gated_delta_update") else None,
               "mlx-lm": lambda: mlx_lm_delta(*args)})
        rows.append(Row(f"{label} (T={T_time})" if repeats else label, _run_check(lambda: check_fn(*like(T_check))), ms))
    return rows


@contextlib.contextmanager
def _from_checkout(*names: str) -> Iterator[bool]:
    """Make tests/<name> importable for the duration; False when this is not a source checkout."""
    paths = [str(TESTS_DIR / n) if n == "metal_emu" else str(TESTS_DIR) for n in names]
    if not all((TESTS_DIR / n).is_dir() for n in names):
        yield False
        return
    sys.path[:0] = paths
    try:
        yield True
    finally:
        del sys.path[: len(paths)]


def emulator_rows(s: Shapes = SMALL) -> List[Row]:
    """Every kernel run by the MSL emulator against its twin (small shapes: it is a CPU simulation)."""
    with _from_checkout("metal_emu") as found:
        if not found:
            return [Row("emulator", "skipped: needs a source checkout (tests/metal_emu)")]
        import metal_emu

        saved = kernels.use_metal, gd.use_metal
        kernels.reset()
        kernels.use_metal = gd.use_metal = lambda: True
        try:
            with metal_emu.emulate_metal(strict=True):
                rows = moe_rows(s, 0) + delta_rows(s, 0)
        finally:
            kernels.use_metal, gd.use_metal = saved
            kernels.reset()
    for row in rows:
        row.kernel += " [emulator]"
    return rows


def syntax_rows() -> List[Row]:
    """The Metal-rules syntax check of every kernel (clang), at the shape sets of tests/msl_check."""
    with _from_checkout("msl_check") as found:
        if not found:
            return [Row("syntax check", "skipped: needs a source checkout (tests/msl_check)")]
        import msl_check
        from msl_check import cases

        if not msl_check.clang_available():
            return [Row("syntax check", "skipped: clang not installed")]
        rows = []
        for shapes in cases.SHAPES:
            sources = [src for fn, args in cases.calls(shapes).values() for src in msl_check.mlx_sources(fn, *args)]
            for d in msl_check.check_sources(sources):
                status = "ok" if d.ok else "FAIL: " + d.errors.splitlines()[0]
                rows.append(Row(f"{d.kernel} [syntax, {shapes.name}]", status))
    return rows


def run(repeats: int = 20, shapes: Shapes = A3B) -> Dict[str, object]:
    """The whole report, as ``--json`` prints it."""
    if on_metal():
        kernels.reset()
        mode = f"Metal: checked and timed at {shapes.name} shapes (ms, median of {repeats})"
        rows = moe_rows(shapes, repeats) + delta_rows(shapes, repeats)
    else:
        mode = "no Metal device: kernels checked in the MSL emulator, and by the Metal-rules syntax check"
        rows = emulator_rows() + syntax_rows()
    return {"environment": environment(), "mode": mode, "rows": [asdict(r) for r in rows]}


def failed(report: Dict[str, object]) -> bool:
    return any(row["check"].startswith("FAIL") for row in report["rows"])


PATHS = ("ours", "ops", "mx.fast", "mlx-lm")


def format_report(report: Dict[str, object]) -> str:
    env = report["environment"]
    lines = [" ".join(f"{k} {v}" for k, v in env.items()), report["mode"], ""]
    timed = any(row["ms"] for row in report["rows"])
    head = ["kernel", "check"] + ([f"{p} ms" for p in PATHS] if timed else [])
    table = [head]
    for row in report["rows"]:
        cells = [row["kernel"], row["check"]]
        if timed:
            cells += ["-" if row["ms"].get(p) is None else f"{row['ms'][p]:.3f}" for p in PATHS]
        table.append(cells)
    widths = [max(len(r[i]) for r in table) for i in range(len(head))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in table]
    return "\n".join(lines)
