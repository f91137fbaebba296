"""Per-layer decoding state, compatible with mlx-lm's cache protocol.

Both classes extend mlx-lm's caches (so mlx-lm's generation utilities accept
them) and add ``snapshot``/``restore``: speculative decoding and prompt reuse
roll a layer back to an earlier point exactly.
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

import mlx.core as mx
import mlx_lm.models.cache as _mlx_lm_cache
from mlx_lm.models.cache import ArraysCache, BatchKVCache, KVCache

from .ops.gated_delta import gated_delta_steps, gated_delta_update


class AttentionCache(KVCache):
    """Keys and values of a full-attention layer; rolling back only moves the offset."""

    def snapshot(self) -> int:
        return self.offset

    def restore(self, snapshot: int) -> None:
        self.offset = snapshot

    @classmethod
    def merge(cls, caches: Sequence["AttentionCache"]) -> "BatchAttentionCache":
        return BatchAttentionCache.merge(caches)


class BatchAttentionCache(BatchKVCache):
    """mlx-lm's left-padded batch of KV caches whose rows come back out as ``AttentionCache``."""

    @classmethod
    def merge(cls, caches: Sequence[KVCache]) -> "BatchAttentionCache":
        if all(c.size() == 0 for c in caches):
            return cls([0] * len(caches))  # mlx-lm's merge returns its base class here
        return super().merge(caches)

    def extract(self, idx: int) -> AttentionCache:
        row = super().extract(idx)
        cache = AttentionCache()
        cache.keys, cache.values, cache.offset = row.keys, row.values, row.offset
        return cache


class DeltaNetCache(ArraysCache):
    """Conv state (B, K-1, conv_dim) and recurrent state (B, Hv, Dv, Dk, float32) of a DeltaNet layer.

    ``delta_update`` advances the recurrent state by a block. While ``record_steps`` is set it
    also keeps, for the last block, the conv input and the recurrent state after every token,
    so that ``trim`` can drop that block's last tokens exactly (speculative decoding rejects
    drafts this way). Keep it off for prefill: it holds one recurrent state per token of the block.
    """

    # Class defaults, so that mlx-lm's from_state (which skips __init__) gives a working cache.
    record_steps = False
    _block: Optional[Tuple[mx.array, List[Optional[mx.array]]]] = None

    def __init__(self, size: int = 2, left_padding: Optional[List[int]] = None) -> None:
        # mlx-lm's ArraysCache.merge builds the batched cache as cls(size)
        if size != 2:
            raise ValueError(f"DeltaNetCache holds 2 arrays (conv, recurrent), not size={size}")
        super().__init__(size=2, left_padding=left_padding)
        self.record_steps = False
        self._block: Optional[Tuple[mx.array, List[Optional[mx.array]]]] = None

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
        self._block = None

    def extract(self, idx: int) -> "DeltaNetCache":
        """Row ``idx`` of a batched cache as a cache of its own (ArraysCache's returns its base class)."""
        cache = DeltaNetCache()
        cache.cache = [None if c is None else mx.contiguous(c[idx : idx + 1]) for c in self.cache]
        return cache

    def delta_update(
        self, conv_in: mx.array, q: mx.array, k: mx.array, v: mx.array, a: mx.array, b: mx.array,
        A_log: mx.array, dt_bias: mx.array, mask: Optional[mx.array] = None,
    ) -> mx.array:
        """Run the delta rule over a block from this cache's state, keep the new state, and return
        the block's output. conv_in: (B, K-1+T, C), the conv state before the block then its T
        inputs (kept with the per-token states while ``record_steps``)."""
        if self.record_steps:
            out, states = gated_delta_steps(q, k, v, a, b, A_log, dt_bias, self.recurrent_state, mask)
            self._block, self.cache[1] = (conv_in, states), states[-1]
        else:
            out, self.cache[1] = gated_delta_update(q, k, v, a, b, A_log, dt_bias, self.recurrent_state, mask)
        return out

    def trim(self, n: int) -> int:
        """Forget the last ``n`` tokens of the last recorded block; returns ``n``."""
        if n == 0:
            return 0
        if self._block is None or not 0 < n < len(self._block[1]):
            recorded = 0 if self._block is None else len(self._block[1]) - 1
            raise ValueError(f"cannot trim {n} tokens: the last recorded block holds {recorded}")
        conv_in, states = self._block
        keep = len(states) - 1 - n
        width = conv_in.shape[1] - (len(states) - 1)
        self.cache = [mx.contiguous(conv_in[:, keep : keep + width]), states[keep]]
        self._block = None
        return n


def snapshot_caches(caches: Sequence[Any]) -> List[Any]:
    return [c.snapshot() for c in caches]


def restore_caches(caches: Sequence[Any], snapshots: Sequence[Any]) -> None:
    for c, s in zip(caches, snapshots):
        c.restore(s)


# mlx-lm's load_prompt_cache looks cache classes up by name in its own module's globals and has
# no registry to extend; naming ours there, once, is what lets mlx_lm.models.cache's
# save_prompt_cache/load_prompt_cache round-trip our caches (loading otherwise raises KeyError).
_mlx_lm_cache.AttentionCache = AttentionCache
_mlx_lm_cache.DeltaNetCache = DeltaNetCache
