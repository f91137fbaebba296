"""Streaming conversion of a Hugging Face checkpoint to a quantized mlx-lm directory.

Tensors are read a row range at a time (experts, vocabulary rows; at most ``CHUNK_BYTES``
of source), mapped by ``hf_to_mlx`` (the loader's own mapping), quantized and written into
shards laid out in advance from the plan, so peak memory is one chunk plus the largest
tensor that cannot be split, never the checkpoint. Output goes to a hidden directory beside
DST that is renamed to DST only once complete.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import re
import shutil
import sys
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple, Union

import mlx.core as mx
from mlx_lm.utils import save_config
from tqdm import tqdm

from mlx_qwenmoe.checkpoint import hf_to_mlx, layer_groups, per_expert_key, rows_independent
from mlx_qwenmoe.config import ModelArgs, quantization_of, read_config
from mlx_qwenmoe.errors import CheckpointError, ConfigError, ModelNotFoundError, OutputError
from mlx_qwenmoe.hub import fetch_file
from mlx_qwenmoe.loading import HUB_PATTERNS, resolve_model_path

from .destination import check_destination, check_overwrite, describe_bytes, staging
from .plan import DEFAULT_CONTEXT, DEFAULT_RESERVE, Plan, plan_conversion
from .source import SourceTensor, source_tensors
from .writer import MAX_SHARD_BYTES, ShardWriter

CHUNK_BYTES = 64 << 20
# Everything the Hub download brings but the weights, their index and the config we rewrite.
_NOT_COPIED = ("config.json", "*.safetensors", "*.index.json")

Log = Callable[[str], None]


def convert(
    src: Union[str, Path],
    dst: Union[str, Path, None] = None,
    *,
    bits: int = 4,
    group_size: int = 64,
    fit: Union[None, int, str] = None,
    context: int = DEFAULT_CONTEXT,
    reserve: Union[int, str] = DEFAULT_RESERVE,
    dtype: Optional[str] = None,
    dry_run: bool = False,
    force: bool = False,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    log: Log = lambda _line: None,
    progress: bool = False,
) -> Plan:
    """Convert ``src`` (local directory or Hub repo id) into mlx-lm's format at ``dst``; returns the plan.

    ``dry_run``: only plan (and ``log`` the plan); ``src`` may then also be a config.json file,
    or a Hub repo id of which only config.json is fetched. See ``plan_conversion`` for the
    recipe options. ``dst`` is replaced only with ``force``. ``progress`` shows a bar on stderr
    (bytes of the source done, rate, ETA).
    """
    if dry_run:
        config, tensors, where = _dry_run_source(src)
    else:
        model_dir = resolve_model_path(str(src))
        config, where = read_config(model_dir), str(Path(model_dir) / "config.json")
        tensors = None
    if quantization_of(config) or config.get("quantization_config"):
        raise ConfigError(f"{where}: the checkpoint is already quantized; convert takes a float (BF16/F16/F32) checkpoint")
    if not dry_run:
        if dst is None:
            raise OutputError("convert: give dst (or dry_run=True)")
        dst = Path(dst).expanduser()
        check_destination(model_dir, dst)
        check_overwrite(dst, force)
        tensors = source_tensors(model_dir)
    mtp_layers = _mtp_layers(tensors) if tensors is not None else None
    plan = plan_conversion(config, bits=bits, group_size=group_size, fit=fit, context=context, reserve=reserve,
                           dtype=dtype, mtp_layers=mtp_layers, source=where)
    log(plan.summary())
    if dry_run:
        return plan
    args = ModelArgs.from_config(config, source=where)
    with staging(dst, force, plan.weight_bytes) as tmp:
        with tqdm(total=sum(t.nbytes for t in tensors.values()), unit="B", unit_scale=True, unit_divisor=1024,
                  desc="converting", disable=not progress, file=sys.stderr, leave=False) as bar:
            _write_weights(tmp, plan, tensors, args, max_shard_bytes, log if not progress else bar.write, bar)
        _write_config(tmp / "config.json", config, args, plan)
        _copy_side_files(model_dir, tmp)
    log(f"wrote {describe_bytes(plan.weight_bytes)} of weights to {dst}")
    return plan


def _dry_run_source(src: Union[str, Path]) -> Tuple[dict, Optional[Dict[str, SourceTensor]], str]:
    """The config (and the tensors, when there are weights) of a directory, config file or Hub repo."""
    path = Path(src).expanduser()
    if path.is_dir():
        has_weights = any(path.glob("*.safetensors")) or (path / "model.safetensors.index.json").exists()
        return read_config(path), source_tensors(path) if has_weights else None, str(path / "config.json")
    if not path.exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", str(src)):
        path = fetch_file(str(src), "config.json")
    if not path.is_file():
        raise ModelNotFoundError(f"{src}: not a model directory, config file or Hugging Face repo id")
    try:
        config = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})".splitlines()[0]) from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return config, None, str(path)


def _mtp_layers(tensors: Dict[str, SourceTensor]) -> int:
    layers = {int(m.group(1)) for k in tensors if (m := re.match(r"mtp\.layers\.(\d+)\.", k))}
    return max(layers) + 1 if layers else 0


def _write_weights(
    out_dir: Path, plan: Plan, tensors: Dict[str, SourceTensor], args: ModelArgs, max_shard_bytes: int, log: Log,
    bar: tqdm,
) -> None:
    # A checkpoint already in MLX's conv layout already carries its +1 norm offsets (as in Model.sanitize).
    from_hf = any(k.endswith("conv1d.weight") and t.shape[-1] != 1 for k, t in tensors.items())
    writer = ShardWriter(out_dir, [o for t in plan.tensors for o in t.outputs], max_shard_bytes)
    try:
        emit = _Emitter(plan, writer, bar)
        for group, names in layer_groups(tensors).items():
            log(f"converting {group}")
            singles, experts = _units(names, args)
            for name in singles:
                _convert_rows(tensors[name], args, from_hf, emit)
            for (prefix, proj), by_index in experts.items():
                _convert_experts(prefix, proj, [tensors[n] for n in by_index], args, from_hf, emit)
            mx.clear_cache()
        writer.close()
    except BaseException:
        writer.abort()
        raise


def _units(names: List[str], args: ModelArgs) -> Tuple[List[str], Dict[Tuple[str, str], List[str]]]:
    """Tensors mapped on their own, and per-expert tensors grouped to be stacked (expert order)."""
    singles: List[str] = []
    experts: Dict[Tuple[str, str], Dict[int, str]] = defaultdict(dict)
    for name in sorted(names):
        key = per_expert_key(name)
        if key is None:
            singles.append(name)
        else:
            experts[(key[0], key[2])][key[1]] = name
    ordered = {}
    for (prefix, proj), by_index in experts.items():
        if sorted(by_index) != list(range(args.num_experts)):
            missing = [e for e in range(args.num_experts) if e not in by_index]
            detail = f"expert {missing[0]} is missing" if missing else f"{len(by_index)} experts, config says {args.num_experts}"
            raise CheckpointError(f"{prefix}.experts.*.{proj}: {detail}")
        ordered[(prefix, proj)] = [by_index[e] for e in range(args.num_experts)]
    return singles, ordered


def _convert_rows(tensor: SourceTensor, args: ModelArgs, from_hf: bool, emit: "_Emitter") -> None:
    """One source tensor, in row chunks when its mapping allows (``rows_independent``)."""
    rows = tensor.shape[0] if tensor.shape else 1
    step = max(1, CHUNK_BYTES // max(tensor.row_bytes, 1)) if tensor.shape and rows_independent(tensor.name) else rows
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        chunk = tensor.read(start, stop) if tensor.shape else tensor.read()
        emit.bar.update((stop - start) * tensor.row_bytes if tensor.shape else tensor.nbytes)
        for name, value in hf_to_mlx({tensor.name: chunk}, args, from_hf=from_hf).items():
            emit(name, value, start)


def _convert_experts(prefix: str, proj: str, per_expert: List[SourceTensor], args: ModelArgs, from_hf: bool,
                     emit: "_Emitter") -> None:
    """Per-expert tensors, stacked by ``hf_to_mlx`` a chunk of experts at a time (renumbered from 0)."""
    step = max(1, CHUNK_BYTES // per_expert[0].nbytes)
    pattern = re.compile(r"\.experts\.\d+\.")
    for start in range(0, len(per_expert), step):
        chunk = per_expert[start : start + step]
        inputs = {pattern.sub(f".experts.{i}.", t.name): t.read() for i, t in enumerate(chunk)}
        emit.bar.update(sum(t.nbytes for t in chunk))
        for name, value in hf_to_mlx(inputs, replace(args, num_experts=len(chunk)), from_hf=from_hf).items():
            emit(name, value, start)


class _Emitter:
    """Casts, quantizes as planned and writes rows of a mapped tensor."""

    def __init__(self, plan: Plan, writer: ShardWriter, bar: tqdm):
        self.plan, self.writer, self.bar = plan, writer, bar

    def __call__(self, name: str, value: mx.array, row: int) -> None:
        if name not in self.plan:
            raise CheckpointError(f"unexpected tensor {name}: the model described by config.json has no such parameter")
        t = self.plan[name]
        if tuple(value.shape[1:]) != t.shape[1:] or value.ndim != len(t.shape):
            raise CheckpointError(f"tensor {name} has shape {tuple(value.shape)} (rows {row}+), expected {t.shape}")
        value = value.astype(getattr(mx, t.dtype))
        if t.bits is None:
            mx.eval(value)
            self.writer.write(name, value, row)
            return
        w, scales, biases = mx.quantize(value, group_size=t.group_size, bits=t.bits)
        mx.eval(w, scales, biases)
        for (out_name, *_), array in zip(t.outputs, (w, scales, biases)):
            self.writer.write(out_name, array, row)


def _write_config(path: Path, config: dict, args: ModelArgs, plan: Plan) -> None:
    """The source config as mlx-lm's qwen3_5_moe reads it, with the plan's quantization."""
    out = copy.deepcopy(config)
    out["model_type"] = "qwen3_5_moe"  # also for qwen3_5_moe_text / qwen3_next sources: mlx-lm's class for all
    text = out.get("text_config", out)
    # mlx-lm takes RoPE only from rope_parameters (else a wrong default theta); Qwen3-Next configs lack it.
    text.setdefault("rope_parameters", {
        "rope_type": "default", "rope_theta": args.rope_theta, "partial_rotary_factor": args.partial_rotary_factor,
    })
    for c in (out, text):
        for key in ("dtype", "torch_dtype"):
            if key in c:
                c[key] = plan.dtype
    out["quantization"] = plan.quantization_config()
    save_config(out, path)  # mlx-lm's: drops vision_config, mirrors quantization_config, sorts keys


def _copy_side_files(model_dir: Path, out_dir: Path) -> None:
    """Tokenizer, chat template and generation files (what the Hub download brings besides weights)."""
    for path in sorted(Path(model_dir).iterdir()):
        name = path.name
        if path.is_file() and any(fnmatch.fnmatch(name, p) for p in HUB_PATTERNS) and not any(
            fnmatch.fnmatch(name, p) for p in _NOT_COPIED
        ):
            shutil.copyfile(path, out_dir / name)

