"""Reading one routed expert's rows straight from the safetensors files with ``pread``.

A stacked expert tensor (E, ...) stores expert e's row as one contiguous byte range,
so an expert is one ``preadv`` per tensor (weight, scales, biases of the gate, up
and down projections), into a reused staging buffer. Before any read the file's
size and modification time are compared with what they were at load time, and a
short read is an error: a checkpoint truncated or rewritten under a running model
fails with one line naming the file, never with garbage weights.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import mlx.core as mx
import numpy as np

from ..errors import CheckpointError
from ..loading import check_safetensors, weight_files

# safetensors dtype -> (numpy dtype the bytes are viewed as, MLX dtype they hold)
_DTYPES = {
    "U32": (np.uint32, mx.uint32),
    "F32": (np.float32, mx.float32),
    "F16": (np.float16, mx.float16),
    "BF16": (np.uint16, mx.bfloat16),
}


@dataclass(frozen=True)
class TensorRows:
    """Where a stacked (E, ...) tensor lives: file, absolute offset of row 0, bytes per row, dtype code."""

    file: int
    offset: int
    row_bytes: int
    rows: int
    row_shape: Tuple[int, ...]
    dtype: str

    def as_mlx(self, raw: np.ndarray) -> mx.array:
        """``raw`` (n, row_bytes) uint8 rows as an MLX (n, *row_shape) array of the stored dtype."""
        np_dtype, mx_dtype = _DTYPES[self.dtype]
        a = mx.array(raw.view(np_dtype).reshape(raw.shape[0], *self.row_shape))
        return a.view(mx_dtype) if mx_dtype == mx.bfloat16 else a


class CheckpointFiles:
    """The open safetensors files of a checkpoint and the header of each tensor in them."""

    def __init__(self, model_dir: Path):
        self.paths: List[Path] = weight_files(Path(model_dir))
        self._fds: List[int] = []
        self._stamp: List[Tuple[int, int]] = []
        self._tensors: Dict[str, Tuple[int, dict, int]] = {}
        for i, path in enumerate(self.paths):
            header = check_safetensors(path)
            fd = os.open(path, os.O_RDONLY)
            self._fds.append(fd)
            st = os.fstat(fd)
            self._stamp.append((st.st_size, st.st_mtime_ns))
            with open(path, "rb") as f:
                data_start = 8 + int.from_bytes(f.read(8), "little")
            for name, info in header.items():
                self._tensors[name] = (i, info, data_start)
        self._buffers: Dict[int, List[np.ndarray]] = {}
        self._lock = threading.Lock()

    def rows(self, name: str, rows: int, row_shape: Sequence[int]) -> TensorRows:
        """The stacked tensor ``name``, checked to hold ``rows`` rows of ``row_shape``."""
        if name not in self._tensors:
            raise CheckpointError(
                f"{self.paths[0].parent}: no tensor {name}; streaming experts (max_resident) needs them stacked "
                "as mlx-lm stores them (convert the checkpoint with `mlx_qwenmoe convert`)"
            )
        i, info, data_start = self._tensors[name]
        shape, dtype = tuple(info["shape"]), info["dtype"]
        if shape != (rows, *row_shape) or dtype not in _DTYPES:
            raise CheckpointError(
                f"{self.paths[i]}: tensor {name} is {list(shape)} {dtype}, expected {[rows, *row_shape]} "
                f"in one of {', '.join(_DTYPES)}"
            )
        start, end = info["data_offsets"]
        return TensorRows(i, data_start + start, (end - start) // rows, rows, tuple(row_shape), dtype)

    def read(self, ranges: Sequence[Tuple[int, int, int]], out: np.ndarray) -> None:
        """Fill ``out`` (uint8) with the (file, offset, length) ``ranges``, back to back."""
        pos = 0
        view = memoryview(out)
        for i in sorted({r[0] for r in ranges}):
            self._check_unchanged(i)
        for i, offset, length in ranges:
            got = os.preadv(self._fds[i], [view[pos : pos + length]], offset)
            if got != length:
                raise CheckpointError(
                    f"{self.paths[i]}: truncated: read {got} of {length} bytes at offset {offset}"
                )
            pos += length

    def _check_unchanged(self, i: int) -> None:
        st = os.fstat(self._fds[i])
        size, mtime = self._stamp[i]
        if st.st_size < size:
            raise CheckpointError(f"{self.paths[i]}: truncated since it was loaded ({st.st_size} of {size} bytes)")
        if (st.st_size, st.st_mtime_ns) != (size, mtime):
            raise CheckpointError(f"{self.paths[i]}: modified since it was loaded; reload the model")

    def buffer(self, nbytes: int) -> np.ndarray:
        """A staging buffer of ``nbytes``, reused once ``release``d (readers run on several threads)."""
        with self._lock:
            free = self._buffers.setdefault(nbytes, [])
            return free.pop() if free else np.empty(nbytes, dtype=np.uint8)

    def release(self, buf: np.ndarray) -> None:
        with self._lock:
            self._buffers[buf.nbytes].append(buf)

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []
