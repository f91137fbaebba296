"""Samplers: what a sampler draws from, and the log-probabilities it is given.

mlx-lm's conventions: a sampler maps (rows of) log-probabilities to token ids, and a logits
processor maps (token history, logits) to logits. ``SamplerSpec`` keeps the parameters of
mlx-lm's ``make_sampler`` so that speculative decoding can also compute the distribution
the sampler draws from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import mlx.core as mx
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p, make_sampler

Sampler = Callable[[mx.array], mx.array]
LogitsProcessor = Callable[[mx.array, mx.array], mx.array]

__all__ = ["LogitsProcessor", "Sampler", "SamplerSpec", "log_probs"]


def log_probs(logits: mx.array, history: Optional[mx.array], processors: Sequence[LogitsProcessor]) -> mx.array:
    """The logits processors (which see the token ``history``), then log-softmax, as mlx-lm's
    ``generate_step`` gives a sampler its input."""
    for processor in processors:
        logits = processor(history, logits)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


@dataclass
class SamplerSpec:
    """mlx-lm's ``make_sampler`` parameters, kept so speculative sampling can compute the
    distribution the sampler draws from. Callable as a sampler (logprobs -> tokens), so
    one object serves plain and speculative decoding."""

    temp: float = 0.0
    top_p: float = 0.0
    min_p: float = 0.0
    top_k: int = 0
    min_tokens_to_keep: int = 1
    _sample: Callable[[mx.array], mx.array] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._sample = make_sampler(
            temp=self.temp, top_p=self.top_p, min_p=self.min_p,
            min_tokens_to_keep=self.min_tokens_to_keep, top_k=self.top_k,
        )

    @property
    def greedy(self) -> bool:
        return self.temp == 0

    def __call__(self, logprobs: mx.array) -> mx.array:
        return self._sample(logprobs)

    def probs(self, logprobs: mx.array) -> mx.array:
        """The distribution ``self(logprobs)`` samples from, per row (filters in make_sampler's order)."""
        if self.greedy:
            return (mx.arange(logprobs.shape[-1]) == mx.argmax(logprobs, axis=-1, keepdims=True)).astype(mx.float32)
        x = logprobs
        if 0 < self.top_p < 1.0:
            x = apply_top_p(x, self.top_p)
        if self.min_p != 0.0:
            x = apply_min_p(x, self.min_p, self.min_tokens_to_keep)
        if self.top_k > 0:
            x = apply_top_k(x, self.top_k)
        return mx.softmax(x.astype(mx.float32) * (1.0 / self.temp), axis=-1)
