"""Sharded safetensors output whose layout is fixed before any tensor is computed.

The plan knows every output tensor's name, shape and dtype, so each shard's header is
written first and tensors (or row ranges of them) are written into their place as they
are produced, in any order: no shard is ever held in memory. The result is what
``mlx_lm.utils.save_model`` writes: ``model.safetensors`` or ``model-0000i-of-0000n.safetensors``
plus ``model.safetensors.index.json``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import BinaryIO, Dict, List, Sequence, Tuple

import mlx.core as mx
import numpy as np

from mlx_qwenmoe.errors import CheckpointError

MAX_SHARD_BYTES = 5 * 10**9  # "5GB" as Hugging Face counts it, so also under mlx-lm's 5 GiB
_CODES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32", "uint32": "U32"}
_ITEMSIZE = {"bfloat16": 2, "float16": 2, "float32": 4, "uint32": 4}

Entry = Tuple[str, Tuple[int, ...], str]  # name, shape, dtype


def split_shards(entries: Sequence[Entry], max_bytes: int) -> List[List[Entry]]:
    """mlx-lm's ``make_shards`` rule on sizes alone: fill a shard in order until the next tensor
    would pass ``max_bytes``; a tensor larger than that gets a shard of its own."""
    shards: List[List[Entry]] = []
    size = 0
    for e in entries:
        n = _nbytes(e)
        if not shards or size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += n
    return shards


def _nbytes(entry: Entry) -> int:
    return math.prod(entry[1]) * _ITEMSIZE[entry[2]]


def _header(entries: Sequence[Entry]) -> Tuple[bytes, Dict[str, int]]:
    """The safetensors header (padded to 8 bytes, as the format recommends) and each tensor's data offset."""
    meta: Dict[str, object] = {"__metadata__": {"format": "mlx"}}
    offsets, pos = {}, 0
    for name, shape, dtype in entries:
        meta[name] = {"dtype": _CODES[dtype], "shape": list(shape), "data_offsets": [pos, pos + _nbytes((name, shape, dtype))]}
        offsets[name] = pos
        pos += _nbytes((name, shape, dtype))
    raw = json.dumps(meta, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw, offsets


class ShardWriter:
    """Writes the planned tensors into ``directory``; ``close`` checks that every row was written."""

    def __init__(self, directory: Path, entries: Sequence[Entry], max_shard_bytes: int = MAX_SHARD_BYTES):
        self.directory = Path(directory)
        self._entries = {e[0]: e for e in entries}
        shards = split_shards(entries, max_shard_bytes)
        self._files: List[BinaryIO] = []
        self._where: Dict[str, Tuple[int, int]] = {}  # name -> (shard, absolute offset)
        self.weight_map: Dict[str, str] = {}
        self._rows_left = {e[0]: (e[1][0] if e[1] else 1) for e in entries}
        for i, shard in enumerate(shards):
            fname = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            header, offsets = _header(shard)
            f = open(self.directory / fname, "wb")
            self._files.append(f)
            f.write(header)
            f.truncate(len(header) + sum(map(_nbytes, shard)))
            for name, *_ in shard:
                self._where[name] = (i, len(header) + offsets[name])
                self.weight_map[name] = fname

    def write(self, name: str, array: mx.array, row: int = 0) -> None:
        """Write ``array`` as rows ``row:row + len(array)`` of tensor ``name`` (all of a 0-d/1-d one)."""
        if name not in self._entries:
            raise CheckpointError(f"tensor {name} is not in the plan (the checkpoint does not match its config)")
        _, shape, dtype = self._entries[name]
        rows = array.shape[0] if shape else 1
        if tuple(array.shape[1:]) != tuple(shape[1:]) or row + rows > (shape[0] if shape else 1) or array.ndim != len(shape):
            raise CheckpointError(f"tensor {name} has shape {tuple(array.shape)}, expected {tuple(shape)}")
        if str(array.dtype).rsplit(".", 1)[-1] != dtype:
            raise CheckpointError(f"tensor {name} is {array.dtype}, expected {dtype}")
        data = np.asarray(array.view(mx.uint16) if array.dtype == mx.bfloat16 else array)
        shard, offset = self._where[name]
        f = self._files[shard]
        f.seek(offset + row * (_nbytes(self._entries[name]) // max(shape[0] if shape else 1, 1)))
        f.write(np.ascontiguousarray(data).data)
        self._rows_left[name] -= rows

    def close(self) -> None:
        for f in self._files:
            f.close()
        missing = sorted(k for k, v in self._rows_left.items() if v != 0)
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise CheckpointError(f"the checkpoint has no tensor for {missing[0]}{more}")
        index = {
            "metadata": {"total_size": sum(map(_nbytes, self._entries.values()))},
            "weight_map": dict(sorted(self.weight_map.items())),
        }
        with open(self.directory / "model.safetensors.index.json", "w") as f:
            json.dump(index, f, indent=4)

    def abort(self) -> None:
        for f in self._files:
            f.close()
