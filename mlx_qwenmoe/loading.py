"""Finding a model (local directory or Hugging Face repo) and loading its weights into ``Model``.

Every problem with the files is reported as one line naming the file and tensor:
safetensors headers are checked before MLX reads them, and the mapped tensors are
checked against the model's parameters before ``load_weights``.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.utils import infer_quant_config

from . import hub
from .checkpoint import is_vision_key, keeps_float32, rename
from .config import ModelArgs, quantization_of, read_config
from .errors import CheckpointError, ModelNotFoundError
from .model import Model

_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}
HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken"]


def resolve_model_path(path_or_repo: str) -> Path:
    """A local model directory, or the snapshot of a Hugging Face repo (safetensors only).

    Honours ``HF_HUB_OFFLINE``; an unreachable or stalled Hub is a one-line ``ModelNotFoundError``
    (see ``hub.py`` for the deadline).
    """
    if not str(path_or_repo).strip():
        raise ModelNotFoundError("the model path is empty")
    path = Path(path_or_repo).expanduser()
    if path.is_dir():
        return path
    if path.exists() or not re.fullmatch(r"[\w.-]+/[\w.-]+", str(path_or_repo)):
        raise ModelNotFoundError(f"{path_or_repo}: no such model directory (nor a Hugging Face repo id)")
    return hub.snapshot(str(path_or_repo), HUB_PATTERNS)


def check_safetensors(path: Path) -> Dict[str, dict]:
    """The header of a safetensors file, after checking it describes the bytes actually there."""
    if not path.is_file():
        raise CheckpointError(f"{path}: not a safetensors file (not a regular file)")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100 * 2**20:
            raise CheckpointError(f"{path}: not a safetensors file (header length {n} exceeds the file)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            raise CheckpointError(f"{path}: not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (header is not a JSON object)")
    data_size = size - 8 - n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        _check_entry(path, name, info, data_size)
    return {k: v for k, v in header.items() if k != "__metadata__"}


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_entry(path: Path, name: str, info: object, data_size: int) -> None:
    """One tensor's header entry: known dtype, a shape of counts, offsets spanning exactly its bytes."""
    name = name if name.isprintable() else repr(name)  # an error message stays one line
    try:
        dtype, shape, (start, end) = info["dtype"], info["shape"], info["data_offsets"]
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{path}: tensor {name}: malformed header entry") from None
    if not isinstance(dtype, str) or dtype not in _DTYPE_BYTES:
        raise CheckpointError(f"{path}: tensor {name}: unsupported dtype {dtype!r}")
    if not isinstance(shape, list) or not all(map(_is_count, shape)) or not (_is_count(start) and _is_count(end)):
        raise CheckpointError(f"{path}: tensor {name}: malformed header entry")
    count = 1
    for d in shape:
        count *= d
    if end - start != count * _DTYPE_BYTES[dtype]:
        raise CheckpointError(f"{path}: tensor {name}: header size does not match shape {shape} {dtype}")
    if end > data_size:
        raise CheckpointError(
            f"{path}: truncated: tensor {name} ends at byte {end} but the file holds {data_size} data bytes"
        )


def weight_files(model_dir: Path) -> list:
    """The checkpoint's safetensors files: those of the index if there is one, else all of them."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_bytes())["weight_map"]
            files = sorted(set(weight_map.values()))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise CheckpointError(f"{index}: not a safetensors index (needs a 'weight_map' object)") from None
        for name in files:
            if not isinstance(name, str) or Path(name).name != name:
                raise CheckpointError(f"{index}: lists {name!r}, which is not a file name")
            if not (model_dir / name).exists():
                raise CheckpointError(f"{index}: lists {name}, which is not in {model_dir}")
        return [model_dir / f for f in files]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{model_dir}: no *.safetensors weight files")
    return files


def read_weights(model_dir: Path) -> Tuple[Dict[str, mx.array], Dict[str, Path]]:
    """All tensors (vision tower skipped), and the file each came from."""
    weights: Dict[str, mx.array] = {}
    origin: Dict[str, Path] = {}
    for path in weight_files(model_dir):
        names = [k for k in check_safetensors(path) if not is_vision_key(k)]
        if not names:
            continue
        try:
            arrays = mx.load(str(path))
        except (RuntimeError, ValueError) as e:
            raise CheckpointError(f"{path}: cannot be read ({e})") from None
        for k in names:
            if k in weights:
                raise CheckpointError(f"{path}: tensor {k} is also in {origin[k].name}")
            weights[k] = arrays[k]
            origin[k] = path
    return weights, origin


def _where(key: str, origin: Dict[str, Path]) -> str:
    """' in <file>' for a mapped tensor name, when the source tensor can be traced."""
    stem = key.rsplit(".switch_mlp.", 1)[0]
    for k, path in origin.items():
        if rename(k) == key or rename(k).startswith(stem + ".experts"):
            return f" in {path.name}"
    return ""


def _check_against_model(model: Model, weights: Dict[str, mx.array], origin: Dict[str, Path], model_dir: Path) -> None:
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{model_dir}: missing tensor {missing[0]}{more}")
    unexpected = sorted(set(weights) - set(expected))
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise CheckpointError(f"{model_dir}: unexpected tensor {unexpected[0]}{_where(unexpected[0], origin)}{more}")
    for k, v in weights.items():
        if v.shape != expected[k].shape:
            raise CheckpointError(
                f"{model_dir}: tensor {k}{_where(k, origin)} has shape {tuple(v.shape)}, "
                f"expected {tuple(expected[k].shape)}"
            )


def _quantize(model: Model, config: dict, weights: Dict[str, mx.array]) -> None:
    """Turn the layers the checkpoint stores quantized into quantized layers, as mlx-lm does."""
    quantization = quantization_of(config)
    if quantization is None:
        return

    def predicate(path: str, module: nn.Module):
        if isinstance(quantization.get(path), dict):
            return quantization[path]
        # Without its weight mlx-lm's inference would raise KeyError: report it as missing instead.
        if not hasattr(module, "to_quantized") or f"{path}.scales" not in weights or f"{path}.weight" not in weights:
            return False
        return infer_quant_config(path, module, weights)

    nn.quantize(
        model,
        group_size=quantization["group_size"],
        bits=quantization["bits"],
        mode=quantization.get("mode", "affine"),
        class_predicate=predicate,
    )


def _cast(weights: Dict[str, mx.array], dtype: mx.Dtype) -> Dict[str, mx.array]:
    """Cast float tensors to ``dtype``, but those that ``keeps_float32``."""
    return {
        k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) and not keeps_float32(k) else v
        for k, v in weights.items()
    }


def _experts_float32_on_cpu(weights: Dict[str, mx.array]) -> Dict[str, mx.array]:
    """MLX's CPU gather_mm multiplies float32 only, so unquantized experts are widened there
    (quantized experts go through gather_qmm, which takes any float activations; their
    weights are uint32 and their scales and biases stay as stored)."""
    if mx.default_device() != mx.cpu:
        return weights
    return {
        k: v.astype(mx.float32) if ".switch_mlp." in k and k.endswith(".weight") and v.dtype in (mx.bfloat16, mx.float16) else v
        for k, v in weights.items()
    }


# (model directory, model, mapped tensors, source file of each) -> the tensors this process keeps
ShardHook = Callable[[Path, Model, Dict[str, mx.array], Dict[str, Path]], Dict[str, mx.array]]


def load_model(
    model_dir: Path, *, dtype: Optional[mx.Dtype] = None, lazy: bool = False, shard: Optional[ShardHook] = None
) -> Tuple[Model, dict]:
    """Build ``Model`` from a local directory and load its weights; returns (model, config dict).

    ``shard`` (distributed inference) may substitute modules of the model and cut the tensors
    down to this process's share before anything is cast, quantized or read."""
    if dtype is not None and dtype not in (mx.float16, mx.bfloat16, mx.float32):
        raise ValueError(f"dtype {dtype}: expected mx.float16, mx.bfloat16 or mx.float32")
    model_dir = Path(model_dir)
    config = read_config(model_dir)
    args = ModelArgs.from_config(config, source=str(model_dir / "config.json"))
    raw, origin = read_weights(model_dir)
    mtp_layers = {int(m.group(1)) for k in raw if (m := re.match(r"mtp\.layers\.(\d+)\.", k))}
    if mtp_layers:
        args.mtp_num_hidden_layers = max(mtp_layers) + 1
    model = Model(args, with_mtp=bool(mtp_layers))
    weights = model.sanitize(raw)
    if shard is not None:
        weights = shard(model_dir, model, weights, origin)
    if dtype is not None:
        weights = _cast(weights, dtype)
    weights = _experts_float32_on_cpu(weights)
    _quantize(model, config, weights)
    _check_against_model(model, weights, origin, model_dir)
    model.load_weights(list(weights.items()), strict=True)
    model.eval()
    if not lazy:
        mx.eval(model.parameters())
    return model, config
