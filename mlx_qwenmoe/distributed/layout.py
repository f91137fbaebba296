"""Who holds what: the split of a model's layers and experts over the ranks of a group.

``expert``: one stage; every rank holds all layers and experts ``[g*E/N, (g+1)*E/N)`` of each.
``pipeline``: one rank per stage, each a contiguous range of layers with all their experts.
``expert+pipeline``: two stages (for 4+ ranks, an even count), the experts of a stage's layers
split over its ranks. Ranks ``s*G .. s*G+G-1`` form stage ``s`` (``G`` ranks per stage).
The MTP layers follow the final hidden state, which every rank has, so their experts are
always split over all ranks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence, Tuple

from ..errors import ConfigError

MODES = ("expert", "pipeline", "expert+pipeline")
PIPELINE_STAGES_WITH_EXPERTS = 2


def split_layers(layer_bytes: Sequence[int], capacities: Sequence[int]) -> List[Tuple[int, int]]:
    """Contiguous layer ranges, one per stage, whose bytes are in proportion to ``capacities``.

    Each stage gets at least one layer; the boundary goes where the running total of layer
    bytes crosses the stage's share of the whole.
    """
    n_layers, n_stages = len(layer_bytes), len(capacities)
    if n_stages > n_layers:
        raise ConfigError(f"{n_stages} pipeline stages but the model has only {n_layers} layers")
    total, cap_total = sum(layer_bytes), sum(capacities)
    ranges, start, running, cap_running = [], 0, 0, 0
    for s, cap in enumerate(capacities[:-1]):
        cap_running += cap
        target = total * cap_running / cap_total
        end = start + 1
        running += layer_bytes[start]
        # leave at least one layer for each later stage
        while end < n_layers - (n_stages - 1 - s) and running + layer_bytes[end] / 2 <= target:
            running += layer_bytes[end]
            end += 1
        ranges.append((start, end))
        start = end
    ranges.append((start, n_layers))
    return ranges


def expert_range(num_experts: int, index: int, count: int) -> Tuple[int, int]:
    """Experts ``[lo, hi)`` of member ``index`` of ``count``: static, by expert id."""
    return num_experts * index // count, num_experts * (index + 1) // count


@dataclass(frozen=True)
class Layout:
    mode: str
    rank: int
    size: int
    stages: Tuple[Tuple[int, int], ...]  # layer range of each stage

    @property
    def per_stage(self) -> int:
        """Ranks per stage, G: the experts of a layer are split over these."""
        return self.size // len(self.stages)

    @property
    def stage(self) -> int:
        return self.rank // self.per_stage

    @property
    def layers(self) -> range:
        return range(*self.stages[self.stage])

    def stage_leader(self, stage: int) -> int:
        return stage * self.per_stage

    @property
    def is_stage_leader(self) -> bool:
        return self.rank == self.stage_leader(self.stage)

    def experts(self, num_experts: int) -> Tuple[int, int]:
        """This rank's experts in its stage's layers."""
        return expert_range(num_experts, self.rank % self.per_stage, self.per_stage)

    def mtp_experts(self, num_experts: int) -> Tuple[int, int]:
        return expert_range(num_experts, self.rank, self.size)


def stage_count(mode: str, size: int) -> int:
    """How many pipeline stages ``mode`` makes of ``size`` ranks."""
    if mode not in MODES:
        raise ConfigError(f"parallel={mode!r}: expected one of {', '.join(MODES)}")
    if mode == "expert":
        return 1
    if mode == "pipeline":
        return size
    if size < 4 or size % PIPELINE_STAGES_WITH_EXPERTS:
        raise ConfigError(f"parallel='expert+pipeline' needs an even number of ranks, at least 4 (have {size})")
    return PIPELINE_STAGES_WITH_EXPERTS


def make_layout(mode: str, rank: int, size: int, layer_bytes: Sequence[int]) -> Layout:
    """The layout of ``mode`` over ``size`` ranks of equal memory, layers split by their bytes."""
    stages = stage_count(mode, size)
    return Layout(mode, rank, size, tuple(split_layers(layer_bytes, [1] * stages)))
