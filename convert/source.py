"""Reading a Hugging Face checkpoint a few rows at a time.

``mx.load`` and ``safe_open`` map or read whole tensors; a 256-expert tensor is ~1 GB in
bf16, so the converter instead reads rows (experts, vocabulary rows) of a tensor with
plain file reads, after ``check_safetensors`` has checked every header against the file.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Tuple

import mlx.core as mx
import numpy as np

from mlx_qwenmoe.checkpoint import is_vision_key
from mlx_qwenmoe.errors import CheckpointError
from mlx_qwenmoe.loading import check_safetensors, weight_files

# Source dtypes we convert from; bf16 is read as its bit pattern (numpy has no bfloat16).
_READ = {"BF16": (np.uint16, mx.bfloat16), "F16": (np.float16, None), "F32": (np.float32, None)}
# What ``SourceTensor.read`` can read: also the packed weights of a quantized checkpoint
# (distributed loading reads a rank's experts of one this way).
READABLE = {**_READ, "U32": (np.uint32, None)}


@dataclass(frozen=True)
class SourceTensor:
    path: Path
    name: str
    dtype: str  # safetensors dtype code
    shape: Tuple[int, ...]
    offset: int  # of the first byte in the file

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(READABLE[self.dtype][0]).itemsize

    @property
    def row_bytes(self) -> int:
        return self.nbytes // self.shape[0] if self.shape else self.nbytes

    def read(self, start: int = 0, stop: int = -1) -> mx.array:
        """Rows ``start:stop`` (axis 0; all of it by default) as an MLX array."""
        np_dtype, view = READABLE[self.dtype]
        shape = self.shape
        if shape:
            stop = shape[0] if stop < 0 else stop
            shape = (stop - start, *shape[1:])
        count = math.prod(shape)
        with open(self.path, "rb") as f:
            f.seek(self.offset + start * self.row_bytes)
            data = np.fromfile(f, dtype=np_dtype, count=count)
        if data.size != count:
            raise CheckpointError(f"{self.path}: tensor {self.name}: file ended while reading it")
        array = mx.array(data.reshape(shape))
        return array.view(view) if view is not None else array


def source_tensors(model_dir: Path) -> Dict[str, SourceTensor]:
    """Every tensor of the checkpoint but the vision tower's, with where its bytes are."""
    tensors: Dict[str, SourceTensor] = {}
    for path in weight_files(model_dir):
        header = check_safetensors(path)
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
        for name, info in header.items():
            if is_vision_key(name):
                continue
            if info["dtype"] not in _READ:
                raise CheckpointError(
                    f"{path}: tensor {name} is {info['dtype']}; convert reads float checkpoints (BF16, F16, F32)"
                )
            if name in tensors:
                raise CheckpointError(f"{path}: tensor {name} is also in {tensors[name].path.name}")
            tensors[name] = SourceTensor(path, name, info["dtype"], tuple(info["shape"]), 8 + header_len + info["data_offsets"][0])
    return tensors
