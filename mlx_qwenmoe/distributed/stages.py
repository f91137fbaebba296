"""Pipeline stages: each rank runs only its stage's layers; the hidden state crosses stages
as an ``all_sum`` in which the stage leader contributes it and every other rank zeros.

The ring backend cannot split a group, so the experts of a stage are summed over the whole
group (ranks of other stages add zeros) and every rank walks every layer: for a layer it
does not hold it only takes part in that sum. Chaining each contribution on the previous
result keeps the collectives in the same order on every rank. The same broadcast after
the last stage gives every rank the final hidden state, so every rank computes the same
logits and samples the same token.
"""

from __future__ import annotations

from typing import Any, List, Optional

import mlx.core as mx
import mlx.nn as nn

from ..model import Qwen3_5TextModel
from .layout import Layout


class NullCache:
    """The cache of a layer another stage runs: holds nothing, rolls back trivially.

    It carries the model's last output as its ``state``, so that evaluating the caches after a
    prefill chunk runs every rank's collectives, not only those its own layers' state needs
    (a rank that skipped one would pair the next with the wrong sum)."""

    def __init__(self) -> None:
        self.anchor: Optional[mx.array] = None

    @property
    def state(self) -> List[mx.array]:
        return [] if self.anchor is None else [self.anchor]

    def snapshot(self) -> None:
        return None

    def restore(self, snapshot: None) -> None:
        return None

    def trim(self, n: int) -> int:
        return n


def _chained_zero_sum(h: mx.array, group: mx.distributed.Group) -> mx.array:
    """Take part in a sum this rank contributes nothing to, ordered after ``h``."""
    (zeros,) = mx.depends([mx.zeros_like(h)], [h])
    (h,) = mx.depends([h], [mx.distributed.all_sum(zeros, group=group)])
    return h


class AbsentLayer(nn.Module):
    """A decoder layer held by another stage: no weights; joins that layer's expert sum."""

    def __init__(self, is_sparse_parallel: bool, group: mx.distributed.Group):
        super().__init__()
        self._joins_sum, self._group = is_sparse_parallel, group

    def __call__(self, x: mx.array, cache: Any = None) -> mx.array:
        return _chained_zero_sum(x, self._group) if self._joins_sum else x

    def make_cache(self) -> NullCache:
        return NullCache()


class StagedTextModel(Qwen3_5TextModel):
    """``Qwen3_5TextModel`` with the hidden state broadcast from each stage's leader after its
    last layer. Installed by class substitution, so parameter names do not change."""

    _layout: Layout
    _group: mx.distributed.Group

    def __call__(
        self, inputs: mx.array, cache: Optional[List[Any]] = None, input_embeddings: Optional[mx.array] = None
    ) -> mx.array:
        h = input_embeddings if input_embeddings is not None else self.embed_tokens(inputs)
        ends = {end - 1: s for s, (_, end) in enumerate(self._layout.stages)}
        for i, (layer, c) in enumerate(zip(self.layers, cache or [None] * len(self.layers))):
            h = layer(h, c)
            if i in ends:
                h = self._broadcast(h, ends[i])
        for c in cache or ():
            if isinstance(c, NullCache):
                c.anchor = h
        return self.norm(h)

    def _broadcast(self, h: mx.array, stage: int) -> mx.array:
        if self._layout.rank == self._layout.stage_leader(stage):
            return mx.distributed.all_sum(h, group=self._group)
        return mx.distributed.all_sum(mx.depends([mx.zeros_like(h)], [h])[0], group=self._group)


def install_stages(text_model: Qwen3_5TextModel, layout: Layout, group: mx.distributed.Group,
                   experts_split: bool) -> None:
    """Replace the layers other stages hold by ``AbsentLayer`` and install the broadcasts."""
    owned = layout.layers
    for i, layer in enumerate(text_model.layers):
        if i not in owned:
            sparse = hasattr(layer.mlp, "switch_mlp")
            text_model.layers[i] = AbsentLayer(sparse and experts_split, group)
    text_model.__class__ = StagedTextModel
    text_model._layout, text_model._group = layout, group
