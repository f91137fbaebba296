"""Cutting a model and its checkpoint down to one rank's share.

``Sharder`` is the ``shard`` hook of ``loading.load_model``: given the model built from the
config and the checkpoint's (still lazy) tensors, it substitutes the MoE blocks and the
layers of other stages, and keeps only this rank's tensors. The expert tensors of an mlx-lm
checkpoint (``switch_mlp.*``, expert axis first) are read as the byte range of this rank's
experts straight from the safetensors file, so no rank ever holds a whole expert tensor.
Other layouts (Hugging Face per-expert or fused) are stacked by ``sanitize`` first; there a
layer's full expert tensor is read once, cut, and freed before the next.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, Optional, Tuple

import mlx.core as mx
import numpy as np

from ..convert.source import READABLE, SourceTensor
from ..loading import check_safetensors
from ..model import Model
from .group import checkpoint_digest
from .experts import ExpertParallelMoe, RoutingStats
from .layout import Layout, make_layout
from .stages import install_stages

_LAYER = re.compile(r"^language_model\.model\.layers\.(\d+)\.")


def layer_bytes(weights: Dict[str, mx.array], num_layers: int) -> list:
    """Bytes of each decoder layer's tensors (from their shapes; nothing is read)."""
    sizes = [0] * num_layers
    for k, v in weights.items():
        if m := _LAYER.match(k):
            sizes[int(m.group(1))] += v.nbytes
    return sizes


class Sharder:
    """Substitutes this rank's modules into ``Model`` and cuts the checkpoint to match."""

    def __init__(self, mode: str, group: mx.distributed.Group, stats: RoutingStats):
        self.mode, self.group, self.stats = mode, group, stats
        self.layout: Optional[Layout] = None  # set when the hook runs
        self.ranges: Dict[str, Tuple[int, int]] = {}  # module path of a switch_mlp -> experts held
        self.digest: Optional[bytes] = None  # of the checkpoint, set when the hook runs
        self._headers: Dict[Path, Tuple[dict, int]] = {}

    def __call__(self, model_dir: Path, model: Model, weights: Dict[str, mx.array],
                 origin: Dict[str, Path]) -> Dict[str, mx.array]:
        self.digest = checkpoint_digest(model_dir)
        args = model.args
        self.layout = make_layout(self.mode, self.group.rank(), self.group.size(),
                                  layer_bytes(weights, args.num_hidden_layers))
        self._substitute(model)
        kept = {}
        for k, v in weights.items():
            m = _LAYER.match(k)
            if m and int(m.group(1)) not in self.layout.layers:
                continue
            prefix = k.split(".switch_mlp.")[0] if ".switch_mlp." in k else None
            if prefix in self.ranges:
                v = self._rows(k, v, origin.get(k), *self.ranges[prefix])
            kept[k] = v
        return kept

    def _substitute(self, model: Model) -> None:
        layout, split = self.layout, self.layout.per_stage > 1
        text = model.language_model.model
        for i in layout.layers:
            layer = text.layers[i]
            if split and hasattr(layer.mlp, "switch_mlp"):
                lo, hi = layout.experts(model.args.num_experts)
                layer.mlp = self._parallel(layer.mlp, f"language_model.model.layers.{i}.mlp", lo, hi,
                                           layout.is_stage_leader)
        if len(layout.stages) > 1:
            install_stages(text, layout, self.group, split)
        for i, layer in enumerate(model.mtp.layers if model.has_mtp else []):
            if hasattr(layer.mlp, "switch_mlp"):
                lo, hi = layout.mtp_experts(model.args.num_experts)
                layer.mlp = self._parallel(layer.mlp, f"mtp.layers.{i}.mlp", lo, hi, layout.rank == 0)

    def _parallel(self, block, path: str, lo: int, hi: int, with_shared: bool) -> ExpertParallelMoe:
        self.ranges[f"{path}"] = (lo, hi)
        return ExpertParallelMoe(block, lo, hi, with_shared, path, self.stats, self.group)

    def _rows(self, key: str, value: mx.array, path: Optional[Path], lo: int, hi: int) -> mx.array:
        if path is not None:
            if path not in self._headers:
                with open(path, "rb") as f:
                    self._headers[path] = (check_safetensors(path), 8 + int.from_bytes(f.read(8), "little"))
            header, start = self._headers[path]
            info = header.get(key)
            if info is not None and tuple(info["shape"]) == tuple(value.shape) and info["dtype"] in READABLE:
                source = SourceTensor(path, key, info["dtype"], tuple(info["shape"]), start + info["data_offsets"][0])
                return source.read(lo, hi)
        part = mx.contiguous(value[lo:hi])
        mx.eval(part)
        # a copy through numpy, so the slice does not keep the whole stacked tensor alive
        host = np.array(part.view(mx.uint16) if part.dtype == mx.bfloat16 else part)
        return mx.array(host).view(mx.bfloat16) if part.dtype == mx.bfloat16 else mx.array(host)
