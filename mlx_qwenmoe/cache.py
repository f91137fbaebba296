"""Per-layer decoding state, compatible with mlx-lm's cache protocol.

Both classes extend mlx-lm's caches (so mlx-lm's generation utilities accept
them) and add ``snapshot``/``restore``: speculative decoding and prompt reuse
roll a layer back to an earlier point exactly.
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence

import mlx.core as mx
from mlx_lm.models.cache import ArraysCache, KVCache


class AttentionCache(KVCache):
    """Keys and values of a full-attention layer; rolling back only moves the offset."""

    def snapshot(self) -> int:
        return self.offset

    def restore(self, snapshot: int) -> None:
        self.offset = snapshot


class DeltaNetCache(ArraysCache):
    """Conv state (B, K-1, conv_dim) and recurrent state (B, Hv, Dv, Dk, float32) of a DeltaNet layer."""

    def __init__(self) -> None:
        super().__init__(size=2)

    @property
    def conv_state(self) -> Optional[mx.array]:
        return self.cache[0]

    @property
    def recurrent_state(self) -> Optional[mx.array]:
        return self.cache[1]

    def snapshot(self) -> tuple:
        # MLX arrays are immutable values, so keeping the references is a full copy.
        return tuple(self.cache)

    def restore(self, snapshot: tuple) -> None:
        self.cache = list(snapshot)


def snapshot_caches(caches: Sequence[Any]) -> List[Any]:
    return [c.snapshot() for c in caches]


def restore_caches(caches: Sequence[Any], snapshots: Sequence[Any]) -> None:
    for c, s in zip(caches, snapshots):
        c.restore(s)
