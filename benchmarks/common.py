"""What the benchmarks share: the machine report, model shapes, random quantized checkpoints, timing.

Random checkpoints are what the converter writes, tensor for tensor: the converter's
``Plan`` decides every tensor's bits and group size and ``ShardWriter`` lays out the
shards, while the values are generated directly in quantized form (random packed
uint32 codes with scales/biases chosen so every weight has std ~ 1/sqrt(fan_in)), so
nothing larger than one tensor is ever held in float.
"""

from __future__ import annotations

# Imported before mlx.core on purpose: the package may preload an optimised BLAS.
import mlx_qwenmoe  # noqa: F401  isort: skip

import copy
import datetime
import json
import math
import os
import platform
import resource
import shutil
import statistics
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_qwenmoe.config import ModelArgs
from mlx_qwenmoe.convert.plan import Plan, TensorPlan, plan_conversion
from mlx_qwenmoe.convert.writer import ShardWriter
from mlx_qwenmoe.model import Model

CACHE_ROOT = Path(os.environ.get("MLX_QWENMOE_BENCH_CACHE", "~/.cache/mlx_qwenmoe/bench")).expanduser()

_TINY = dict(
    hidden_size=128, num_hidden_layers=8, vocab_size=1024,
    num_attention_heads=4, num_key_value_heads=2, head_dim=64,
    linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=64, linear_value_head_dim=64,
    num_experts=16, num_experts_per_tok=4, moe_intermediate_size=64, shared_expert_intermediate_size=64,
)
# The real Qwen3.5-35B-A3B layer shapes; only the depth and the vocabulary differ between these two.
_A3B = dict(
    hidden_size=2048, num_attention_heads=16, num_key_value_heads=2, head_dim=256,
    linear_num_key_heads=16, linear_num_value_heads=32, linear_key_head_dim=128, linear_value_head_dim=128,
    num_experts=256, num_experts_per_tok=8, moe_intermediate_size=512, shared_expert_intermediate_size=512,
)
SHAPES: Dict[str, Dict[str, int]] = {
    "tiny": _TINY,
    "a3b-4l": dict(_A3B, num_hidden_layers=4, vocab_size=32000),
    "a3b-full": dict(_A3B, num_hidden_layers=40, vocab_size=248320, mtp_num_hidden_layers=1),
}


def hf_config(shape: str) -> Dict[str, Any]:
    """A Hugging Face style ``config.json`` (``text_config`` nested) for one of ``SHAPES``."""
    text = dict(
        SHAPES[shape],
        model_type="qwen3_5_moe_text",
        full_attention_interval=4,
        linear_conv_kernel_dim=4,
        rms_norm_eps=1e-6,
        norm_topk_prob=True,
        max_position_embeddings=262144,
        rope_parameters={
            "rope_type": "default", "rope_theta": 10_000_000, "partial_rotary_factor": 0.25,
            "mrope_section": [11, 11, 10], "mrope_interleaved": True,
        },
        tie_word_embeddings=False,
    )
    return {"model_type": "qwen3_5_moe", "tie_word_embeddings": False, "text_config": text, "eos_token_id": [2]}


def default_plan(config: Dict[str, Any]) -> Plan:
    """What ``mlx_qwenmoe convert --bits 4`` writes for this config: the converter's own plan."""
    return plan_conversion(config, bits=4, group_size=64)


def quantize_as_planned(module: nn.Module, plan: Plan, prefix: str = "") -> None:
    """Quantize a model (or, with the ``prefix`` that completes its paths, one block of it) in
    memory exactly as ``plan`` writes it to disk."""
    specs = {t.module: {"bits": t.bits, "group_size": t.group_size} for t in plan.tensors if t.bits}
    nn.quantize(module, class_predicate=lambda path, _m: specs.get(prefix + path, False))


def lazy_model(config: Dict[str, Any]) -> Model:
    """Our model (with its MTP layers, if any) for this config; parameters stay unevaluated, so any size is cheap."""
    args = ModelArgs.from_config(config)
    return Model(args, with_mtp=args.mtp_num_hidden_layers > 0)


# --- random tensors -------------------------------------------------------------------------


def _rng(name: str) -> np.random.Generator:
    # Seeded by the name, so a run regenerates the same checkpoint.
    return np.random.Generator(np.random.SFC64(zlib.crc32(name.encode())))


def _scale(name: str, shape: Tuple[int, ...], bits: int, group_size: int) -> np.ndarray:
    """Per-group scales giving weights of std ~ 1/sqrt(fan_in), varied +-10% so groups differ."""
    fan_in = shape[-1] * group_size
    code_std = math.sqrt((4**bits - 1) / 12)  # std of a uniform code in [0, 2^bits - 1]
    base = 1.0 / (code_std * math.sqrt(fan_in))
    return base * _rng(name.rsplit(".", 1)[0]).uniform(0.9, 1.1, size=shape).astype(np.float32)


def random_tensor(name: str, shape: Tuple[int, ...], dtype: str, planned: TensorPlan) -> mx.array:
    """A plausible random value for one tensor the plan writes (``planned.outputs``), in its dtype."""
    if dtype == "uint32":
        return mx.array(_rng(name).integers(0, 2**32, size=shape, dtype=np.uint32))
    if name.endswith((".scales", ".biases")):
        s = _scale(name, shape, planned.bits, planned.group_size)
        x = s if name.endswith(".scales") else -s * (2**planned.bits - 1) / 2  # centre codes on zero
    elif name.endswith("A_log"):
        x = np.log(_rng(name).uniform(1.0, 16.0, size=shape))
    elif name.endswith(("norm.weight", "layernorm.weight", "dt_bias")):
        x = np.ones(shape)  # offset norms are stored as 1 + w
    elif name.endswith("conv1d.weight"):
        x = _rng(name).uniform(-0.5, 0.5, size=shape)
    else:
        x = _rng(name).normal(0.0, shape[-1] ** -0.5, size=shape)
    return mx.array(x.astype(np.float32)).astype(getattr(mx, dtype))


def ensure_checkpoint(directory: Path, config: Dict[str, Any], plan: Plan, log: Callable[[str], None] = print) -> Path:
    """Generate (once) a random checkpoint in ``directory`` laid out and quantized as ``plan`` says,
    written by the converter's own ``ShardWriter``; reuses it when complete. It is built beside
    ``directory`` and renamed into place, so an interrupted run leaves nothing to mistake for it."""
    if (directory / "model.safetensors.index.json").exists():
        written = json.loads((directory / "config.json").read_text()).get("quantization")
        if written == plan.quantization_config():
            return directory
        log(f"{directory}: quantized differently from the plan; generating it again")
    require_resources(memory=0, disk=plan.weight_bytes + (1 << 30), where=directory)
    log(f"generating {plan.weight_bytes / 2**30:.2f} GiB of random weights in {directory} ...")
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.partial-", dir=directory.parent))
    try:
        writer = ShardWriter(tmp, [o for t in plan.tensors for o in t.outputs])
        for t in plan.tensors:
            for name, shape, dtype in t.outputs:
                writer.write(name, random_tensor(name, shape, dtype, t))
        writer.close()
        (tmp / "config.json").write_text(json.dumps(dict(config, quantization=plan.quantization_config()), indent=1))
        shutil.rmtree(directory, ignore_errors=True)  # an incomplete one from an older layout
        os.rename(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


# --- machine report, timing, tables -------------------------------------------------------


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def blas_report() -> str:
    """Whether MLX's CPU matmul runs on an optimised BLAS: the library mapped in, and a timed sgemm.

    numpy's bundled ``scipy_openblas`` exports only suffixed symbols, so MLX cannot use it: ignored.
    """
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        maps = ""
    names = {Path(line.split()[-1]).name for line in maps.splitlines() if line.count("/")}
    libs = sorted(n for n in names if any(t in n.lower() for t in ("openblas", "mkl_rt", "blis")) and "scipy_openblas" not in n)
    a = mx.random.normal((1024, 1024))
    mx.eval(a)
    secs = min(timed(lambda: mx.eval(a @ a)) for _ in range(2))
    return f"{', '.join(libs) or 'none mapped (MLX wheel reference BLAS)'}; MLX fp32 1024^3 matmul {secs * 1e3:.0f} ms"


def machine_report() -> str:
    """Date, machine, and versions: printed at the top of every benchmark."""
    import mlx_lm

    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return "\n".join([
        f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"machine: {platform.system()} {platform.machine()}, {_cpu_name()}, {os.cpu_count()} cores, {mem_gb:.0f} GiB RAM",
        f"mlx {mx.__version__} (device {mx.default_device()}), mlx-lm {mlx_lm.__version__}, numpy {np.__version__}, "
        f"python {platform.python_version()}",
        f"BLAS: {blas_report()}",
    ])


def timed(fn: Callable[[], Any]) -> float:
    """Wall seconds to run ``fn`` (which must evaluate what it builds)."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def cpu_timed(fn: Callable[[], Any]) -> Tuple[float, float]:
    """(wall, CPU) seconds to run ``fn``. On a shared machine wall time mostly measures the other
    jobs; this process's CPU time (all its threads) measures the work and stays stable."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def alternate(runs: Dict[str, Callable[[], Any]], repeats: int) -> Dict[str, List[Any]]:
    """Call each run ``repeats`` times, interleaved and with the order flipped every round
    (so drift in a shared machine's load hits all of them alike); returns their results."""
    out: Dict[str, List[Any]] = {k: [] for k in runs}
    names = list(runs)
    for r in range(repeats):
        for k in names if r % 2 == 0 else names[::-1]:
            out[k].append(runs[k]())
    return out


def best_median(rates: Sequence[float]) -> Tuple[float, float]:
    """Best (highest) and median of a list of rates such as tokens/s."""
    return max(rates), statistics.median(rates)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-markdown table (pastes straight into benchmarks/README.md)."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells)])


def peak_rss_bytes() -> int:
    """The process's peak resident set size so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def available_bytes() -> int:
    """MemAvailable: what can still be allocated without pushing other jobs into swap/OOM."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def clone_cache(cache: Sequence[Any]) -> List[Any]:
    """An independent copy of a per-layer cache list: KVCache writes into its buffers in place,
    so its arrays are copied; ArraysCache only rebinds list entries, so a new list suffices."""
    out = []
    for c in cache:
        c2 = copy.copy(c)
        if hasattr(c, "keys") and c.keys is not None:
            c2.keys, c2.values = mx.array(c.keys), mx.array(c.values)
        if hasattr(c, "cache"):
            c2.cache = list(c.cache)
        out.append(c2)
    return out


def cache_state(cache: Sequence[Any]) -> List[Any]:
    return [c.state for c in cache]




def require_resources(memory: int, disk: int, where: Path) -> Path:
    """Create ``where`` (a benchmark's output or cache folder) and stop with one clear line when
    the machine has less than ``memory`` bytes available or ``where`` less than ``disk`` bytes free."""
    try:
        where.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SystemExit(f"cannot create {where}: {e.strerror or e}") from None
    have_memory, have_disk = available_bytes(), shutil.disk_usage(where).free
    GiB = 1 << 30
    if have_memory < memory:
        raise SystemExit(f"needs {memory / GiB:.2f} GiB of memory, {have_memory / GiB:.2f} GiB available now")
    if have_disk < disk:
        raise SystemExit(f"needs {disk / GiB:.2f} GiB of disk in {where}, {have_disk / GiB:.2f} GiB free")
    return where
