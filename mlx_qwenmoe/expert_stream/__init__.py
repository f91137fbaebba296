"""Models bigger than memory: routed experts stay in the safetensors files and are read on demand.

``stream_experts`` gives every sparse MoE layer a fixed pool of expert slots
(``slots.ExpertSlots``) sized so that all pools together hold ``max_resident`` bytes;
everything else in the model stays resident. Reads go through ``reader`` on a small
thread pool; with ``prefetch``, while layer L computes, layer L+1's likely experts (its
router applied to layer L's input) are already being read.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import List, Tuple

from mlx.utils import tree_flatten

from ..errors import QwenMoeError
from ..model import Model, SparseMoeBlock
from .reader import CheckpointFiles
from .slots import ExpertSlots, StreamStats

READER_THREADS = 4


class BudgetError(QwenMoeError, ValueError):
    """``max_resident`` cannot hold one expert per MoE layer."""


@dataclass
class ExpertStream:
    """The streamed experts of a model: per-layer slot pools, the open files, the counters."""

    layers: List[ExpertSlots]
    files: CheckpointFiles
    executor: ThreadPoolExecutor
    stats: StreamStats

    @property
    def num_slots(self) -> int:
        return self.layers[0].num_slots

    def resident_bytes(self) -> int:
        return sum(s.num_slots * s.expert_bytes for s in self.layers)

    def close(self) -> None:
        self.executor.shutdown(wait=True)
        self.files.close()


def moe_blocks(model: Model) -> List[Tuple[str, SparseMoeBlock]]:
    """(tensor-name prefix, block) of every sparse MoE layer, main layers in order, then the MTP head's."""
    blocks = [(f"language_model.model.layers.{i}.mlp", layer.mlp) for i, layer in enumerate(model.layers)]
    if model.has_mtp:
        blocks += [(f"mtp.layers.{i}.mlp", layer.mlp) for i, layer in enumerate(model.mtp.layers)]
    return [(p, b) for p, b in blocks if isinstance(b, SparseMoeBlock)]


def expert_bytes(block: SparseMoeBlock) -> int:
    """Resident bytes of one routed expert of ``block``."""
    params = tree_flatten(block.switch_mlp.parameters())
    return sum(v.nbytes for _, v in params) // params[0][1].shape[0]


def stream_experts(
    model: Model, model_dir: Path, max_resident: int, *, prefetch: bool = False, policy: str = "lfu"
) -> ExpertStream:
    """Replace every MoE layer's routed experts by a slot pool filled from ``model_dir``'s files.

    ``prefetch``: while a layer computes, read the next layer's predicted experts. It hides read
    latency but reads more (mispredicted experts, and the ones they evict): worth it when compute,
    not the SSD, bounds a token (see benchmarks/README.md, "Streaming experts").

    Call it on a model loaded lazily (``load_model(..., lazy=True)``), before its parameters
    are evaluated, so the full expert tensors are never read. Sets ``model.expert_stream``.
    """
    blocks = moe_blocks(model)
    if not blocks:
        raise BudgetError("max_resident: this model has no routed experts to stream")
    per_expert = expert_bytes(blocks[0][1])
    num_experts = blocks[0][1].switch_mlp.gate_proj.weight.shape[0]
    slots = min(max_resident // (len(blocks) * per_expert), num_experts)
    if slots < 1:
        raise BudgetError(
            f"max_resident={max_resident}: below one expert per MoE layer "
            f"(needs at least {len(blocks) * per_expert} bytes: {len(blocks)} layers x {per_expert})"
        )
    files = CheckpointFiles(model_dir)
    executor = ThreadPoolExecutor(READER_THREADS, thread_name_prefix="expert-reader")
    stats = StreamStats()
    layers = []
    for prefix, block in blocks:
        layers.append(ExpertSlots(prefix, block.switch_mlp, slots, files, executor, stats, block.top_k, policy))
        block.streamed = layers[-1]
    layers[0].counts_tokens = True
    main = [(b, s) for (p, b), s in zip(blocks, layers) if not p.startswith("mtp.")]
    if prefetch:
        for (_, here), (block, there) in zip(main, main[1:]):
            here.next = (block.gate, there)
    stream = ExpertStream(layers, files, executor, stats)
    model.expert_stream = stream
    return stream
