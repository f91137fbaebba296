"""Speculative sampling is exact: many short runs on a model whose distributions are known in
closed form, chi-square against the exact joint distribution of the generated tokens.

The model is a bigram table (the main model) and the same table at a lower temperature (the
MTP head), with the interface ``mtp_generate_step`` uses, so thousands of runs take seconds and
the exact distribution of every 4-token continuation is a product of table rows.
"""

from __future__ import annotations

import math
from typing import Callable

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.sample_utils import make_sampler

from mlx_qwenmoe.sampling import SamplerSpec
from mlx_qwenmoe.speculative import SpecStats, mtp_generate_step

V = 4
STEPS = 4
RUNS = 800


class BigramModel:
    """Main model: next-token logits ``table[current token]``. MTP head: the embedding of the
    token it is given times ``alpha``, so its logits are ``alpha * table[that token]`` -- a
    tempered copy of what the main model will predict after it: close, never equal."""

    has_mtp = True

    def __init__(self, table: np.ndarray, alpha: float):
        self.table = mx.array(table, dtype=mx.float32)
        self.eye = mx.eye(table.shape[0])
        self.alpha = alpha

    def embed(self, ids: mx.array) -> mx.array:
        return self.eye[ids]

    def make_cache(self) -> list:
        return []

    make_mtp_cache = make_cache

    def hidden(self, inputs: mx.array, cache: list) -> mx.array:
        return self.eye[inputs]

    def logits(self, hidden: mx.array) -> mx.array:
        return hidden @ self.table

    def mtp(self, hidden: mx.array, next_embeddings: mx.array, cache: list) -> mx.array:
        return self.alpha * next_embeddings


def chi2_critical(df: int, z: float = 3.29) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile at normal quantile z (p ~ 5e-4)."""
    c = 2.0 / (9.0 * df)
    return df * (1.0 - c + z * math.sqrt(c)) ** 3


def chi2_statistic(counts: np.ndarray, probs: np.ndarray) -> tuple:
    """Pearson's statistic, cells with expected count under 5 pooled into one."""
    expected = probs * counts.sum()
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    keep = exp > 0
    return float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum()), int(keep.sum() - 1)


def joint_distribution(transition: np.ndarray, first: int) -> np.ndarray:
    """P(t_1..t_STEPS) of a Markov chain after token ``first``, flat, the last token fastest."""
    joint = transition[first]
    for _ in range(STEPS - 1):
        joint = (joint[:, None] * transition[np.arange(joint.size) % V]).reshape(-1)
    return joint


def sample_counts(model: BigramModel, sampler: Callable, k: int, stats: SpecStats) -> np.ndarray:
    counts = np.zeros(V**STEPS)
    prompt = mx.array([3, 1])
    for _ in range(RUNS):
        tokens = [t for t, _, _ in mtp_generate_step(
            prompt, model, max_tokens=STEPS, sampler=sampler, logits_processors=None, draft_tokens=k, stats=stats
        )]
        counts[int(np.ravel_multi_index(tokens, (V,) * STEPS))] += 1
    return counts


def processed(sampler: Callable, table: np.ndarray, temp: float) -> np.ndarray:
    """Each row's sampling distribution: SamplerSpec knows it; a plain temperature sampler is softmax(x / temp)."""
    logprobs = mx.array(table) - mx.logsumexp(mx.array(table), axis=-1, keepdims=True)
    if isinstance(sampler, SamplerSpec):
        return np.array(sampler.probs(logprobs), dtype=np.float64)
    x = np.array(logprobs, dtype=np.float64) / temp
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


CASES = [
    # (sampler, temperature, draft tokens): the rejection rule with and without filters,
    # and sample-and-match for a sampler whose distribution the loop cannot see.
    (SamplerSpec(temp=1.0), 1.0, 2),
    (SamplerSpec(temp=0.8, top_k=3), 0.8, 3),
    (SamplerSpec(temp=1.2, top_p=0.85, min_p=0.05), 1.2, 1),
    (make_sampler(temp=0.7), 0.7, 2),
]


@pytest.mark.parametrize("sampler, temp, k", CASES, ids=["rejection", "rejection-top_k", "rejection-top_p-min_p", "match"])
def test_speculative_sampling_matches_the_main_model(sampler, temp, k):
    mx.random.seed(11)
    table = np.random.default_rng(5).standard_normal((V, V)) * 1.5
    model = BigramModel(table, alpha=0.6)
    stats = SpecStats()
    counts = sample_counts(model, sampler, k, stats)
    exact = joint_distribution(processed(sampler, table, temp), first=1)
    stat, df = chi2_statistic(counts, exact)
    assert stat < chi2_critical(df), (stat, df)
    assert 0.05 < stats.acceptance_rate < 0.95, stats  # both branches of the rule ran


def test_the_test_has_power():
    """Sampling from the MTP head's tempered table instead fails the same check."""
    table = np.random.default_rng(5).standard_normal((V, V)) * 1.5
    sampler = SamplerSpec(temp=1.0)
    mx.random.seed(11)
    model = BigramModel(table * 0.6, alpha=1.0)  # its main model is the other one's draft
    counts = sample_counts(model, sampler, 2, SpecStats())
    stat, df = chi2_statistic(counts, joint_distribution(processed(sampler, table, 1.0), first=1))
    assert stat > chi2_critical(df)


@pytest.mark.parametrize(
    "params", [dict(temp=0.7), dict(temp=1.0, top_p=0.8), dict(temp=1.0, min_p=0.3), dict(temp=0.9, top_k=3)]
)
def test_sampler_spec_probs_are_what_it_samples(params):
    mx.random.seed(3)
    spec = SamplerSpec(**params)
    logits = mx.array(np.random.default_rng(1).standard_normal(8) * 1.5, dtype=mx.float32)
    logprobs = logits - mx.logsumexp(logits)
    draws = np.array(spec(mx.broadcast_to(logprobs, (5000, 8))))
    stat, df = chi2_statistic(np.bincount(draws, minlength=8).astype(float), np.array(spec.probs(logprobs[None]))[0])
    assert stat < chi2_critical(df), (stat, df)
