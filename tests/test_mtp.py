"""MTP head loading (both expert layouts, quantized) and MTP speculative decoding on tiny
random checkpoints: greedy output and log-probabilities identical to plain decoding,
exact cache rollback, statistics."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import List

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.generate import generate_step
from mlx_lm.sample_utils import make_logits_processors, make_sampler

from mlx_qwenmoe.cache import DeltaNetCache
from mlx_qwenmoe.errors import CheckpointError
from mlx_qwenmoe.loading import load_model
from mlx_qwenmoe.sampling import SamplerSpec
from mlx_qwenmoe.speculative import SpecStats, mtp_generate_step
from tiny_models import add_mtp, fuse_experts, make_checkpoint

PROMPT = mx.array([1, 5, 7, 9, 11, 3, 42, 17])
TOKENS = 200


def make_agreeing(model: nn.Module, eps: float = 0.8) -> None:
    """Shrink every mixer and MLP output so the main model is close to a bigram model, and make
    the MTP head pass the next token's embedding through to the main model's final norm: the
    MTP then predicts what the main model will, most of the time but not always, so drafts are
    accepted at every position and rejected at every position."""
    h = model.args.hidden_size

    def shrink(layer: nn.Module) -> None:
        mixer = layer.linear_attn.out_proj if layer.is_linear else layer.self_attn.o_proj
        mixer.weight = mixer.weight * eps
        layer.mlp.switch_mlp.down_proj.weight = layer.mlp.switch_mlp.down_proj.weight * eps
        layer.mlp.shared_expert.down_proj.weight = layer.mlp.shared_expert.down_proj.weight * eps

    for layer in [*model.layers, *model.mtp.layers]:
        shrink(layer)
    model.mtp.pre_fc_norm_embedding.weight = mx.ones((h,))
    model.mtp.fc.weight = mx.concatenate([mx.eye(h), mx.zeros((h, h))], axis=1)
    model.mtp.norm.weight = model.language_model.model.norm.weight


@pytest.fixture(scope="module")
def mtp_dir(tmp_path_factory) -> Path:
    out, _ = make_checkpoint(tmp_path_factory.mktemp("mtp"), seed=3)
    add_mtp(out, seed=4)
    return out


@pytest.fixture(scope="module")
def random_model(mtp_dir):
    return load_model(mtp_dir)[0]


@pytest.fixture(scope="module")
def agreeing_model(mtp_dir):
    model = load_model(mtp_dir)[0]
    make_agreeing(model)
    return model


def plain(model, max_tokens: int, **kw) -> List[tuple]:
    return list(generate_step(PROMPT, model, max_tokens=max_tokens, **kw))


def speculative(model, max_tokens: int, k: int, stats=None, **kw) -> List[tuple]:
    return list(mtp_generate_step(PROMPT, model, max_tokens=max_tokens, sampler=kw.pop("sampler", None),
                                  logits_processors=kw.pop("logits_processors", None), draft_tokens=k,
                                  stats=stats, **kw))


def assert_same_as_plain(spec: List[tuple], base: List[tuple]) -> None:
    assert [t for t, _, _ in spec] == [t for t, _ in base]
    np.testing.assert_allclose(
        np.stack([np.array(lp) for _, lp, _ in spec]), np.stack([np.array(lp) for _, lp in base]), atol=1e-4
    )


def test_mtp_head_loads_in_both_expert_layouts(mtp_dir, tmp_path):
    fused = tmp_path / "fused"
    shutil.copytree(mtp_dir, fused)
    fuse_experts(fused, num_experts=8)
    per_expert, _ = load_model(mtp_dir)
    fused_model, _ = load_model(fused)
    assert per_expert.has_mtp and fused_model.has_mtp
    a = dict(tree_flatten(per_expert.mtp.parameters()))
    b = dict(tree_flatten(fused_model.mtp.parameters()))
    assert a.keys() == b.keys() and "layers.0.mlp.switch_mlp.gate_proj.weight" in a
    for k in a:
        np.testing.assert_array_equal(np.array(a[k]), np.array(b[k]), err_msg=k)
    # mtp.* norms are stored as offsets like the main model's: the loader adds the 1.
    raw = mx.load(str(mtp_dir / "model.safetensors"))
    np.testing.assert_allclose(np.array(a["norm.weight"]), 1 + np.array(raw["mtp.norm.weight"]), rtol=1e-6)


def test_quantized_mtp_head_round_trips_and_decodes_identically(random_model, mtp_dir, tmp_path):
    model, _ = load_model(mtp_dir)
    recipe = model.quant_predicate
    nn.quantize(model, group_size=32, bits=8, class_predicate=lambda p, m: hasattr(m, "to_quantized") and recipe(p, m))
    assert isinstance(model.mtp.fc, nn.QuantizedLinear)
    assert model.mtp.layers[0].mlp.gate.bits == 8  # the router recipe reaches the MTP layer too
    mx.save_safetensors(str(tmp_path / "model.safetensors"), dict(tree_flatten(model.parameters())))
    config = json.loads((mtp_dir / "config.json").read_text())
    config["quantization"] = {"group_size": 32, "bits": 8}
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded, _ = load_model(tmp_path)
    assert isinstance(loaded.mtp.layers[0].mlp.switch_mlp.down_proj, type(model.mtp.layers[0].mlp.switch_mlp.down_proj))
    assert_same_as_plain(speculative(loaded, 40, 3), plain(model, 40))


@pytest.fixture(scope="module")
def agreeing_plain(agreeing_model):
    return plain(agreeing_model, TOKENS)


@pytest.fixture(scope="module")
def random_plain(random_model):
    return plain(random_model, 30)


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_greedy_is_identical_to_plain_decoding(agreeing_model, agreeing_plain, random_model, random_plain, k):
    stats = SpecStats()
    assert_same_as_plain(speculative(agreeing_model, TOKENS, k, stats), agreeing_plain)
    assert stats.tokens == TOKENS - 1 and stats.rounds < 0.75 * TOKENS
    # drafts were accepted and rejected at every position
    assert all(0 < a < d for a, d in zip(stats.accepted, stats.drafted)), stats
    # An unrelated random MTP head: nearly every draft is rejected, at the first position.
    assert_same_as_plain(speculative(random_model, 30, k), random_plain)


def test_greedy_with_logits_processor(agreeing_model):
    procs = make_logits_processors(repetition_penalty=1.3, repetition_context_size=8)
    spec = speculative(agreeing_model, 60, 3, logits_processors=procs)
    assert_same_as_plain(spec, plain(agreeing_model, 60, logits_processors=procs))


def test_rollback_leaves_caches_as_plain_decoding(agreeing_model):
    """A verify block of 5 tokens cut back to 2 leaves every layer as running the 2 tokens."""
    model = agreeing_model
    prefix, block = PROMPT[None, :5], mx.array([[8, 9, 10, 11, 12]])
    spec_cache, plain_cache = model.make_cache(), model.make_cache()
    model.hidden(prefix, spec_cache)
    model.hidden(prefix, plain_cache)
    for c in spec_cache:
        if isinstance(c, DeltaNetCache):
            c.record_steps = True
    model.hidden(block, spec_cache)
    for c in spec_cache:
        c.trim(3)
    model.hidden(block[:, :2], plain_cache)
    for s, p in zip(spec_cache, plain_cache):
        if isinstance(s, DeltaNetCache):
            for a, b in zip(s.cache, p.cache):
                np.testing.assert_allclose(np.array(a), np.array(b), atol=1e-5)
        else:
            assert s.offset == p.offset
            np.testing.assert_allclose(*(np.array(x[..., : s.offset, :]) for x in (s.keys, p.keys)), atol=1e-5)
    # the next token sees the same model either way
    nxt = mx.array([[13]])
    np.testing.assert_allclose(
        np.array(model(nxt, spec_cache)), np.array(model(nxt, plain_cache)), atol=1e-4
    )


def test_sampling_uses_the_main_models_distributions(agreeing_model):
    """Whatever is accepted, each yielded token's log-probabilities are the main model's at that
    position: rescoring the whole sequence in one plain forward pass gives the same numbers."""
    # Tiny random models are nearly uniform over the vocabulary: a low temperature lets the
    # sample-and-match rule (any sampler) accept drafts too.
    for sampler in (SamplerSpec(temp=1.0, top_k=20), make_sampler(temp=0.05)):
        mx.random.seed(7)
        stats = SpecStats()
        out = speculative(agreeing_model, 40, 3, stats, sampler=sampler)
        tokens = [t for t, _, _ in out]
        assert 0 < stats.acceptance_rate < 1 and stats.tokens == 39, stats
        logits = agreeing_model(mx.concatenate([PROMPT, mx.array(tokens[:-1], mx.uint32)])[None])[0, PROMPT.size - 1 :]
        expected = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        np.testing.assert_allclose(np.stack([np.array(lp) for _, lp, _ in out]), np.array(expected), atol=1e-4)


class RecordingMTP:
    """The model, with every MTP call's last output row recorded."""

    def __init__(self, model: nn.Module):
        self._model, self.outputs = model, []

    def __getattr__(self, name: str):
        return getattr(self._model, name)

    def mtp(self, hidden: mx.array, next_embeddings: mx.array, cache: list) -> mx.array:
        out = self._model.mtp(hidden, next_embeddings, cache)
        self.outputs.append(np.array(out[0, -1]))
        return out


def test_chunked_prefill_fills_the_mtp_cache_as_one_chunk(random_model):
    """The MTP slot at each chunk boundary pairs with the next chunk's first token: the MTP outputs
    while decoding must not depend on the prefill chunk size."""
    spies = []
    for step in (3, 2048):
        spy = RecordingMTP(random_model)
        list(mtp_generate_step(PROMPT, spy, max_tokens=12, sampler=None, logits_processors=None,
                               prefill_step_size=step, draft_tokens=2))
        spies.append(spy)
    chunked, whole = spies
    assert len(chunked.outputs) == len(whole.outputs) + 2  # two chunk boundaries in an 8-token prompt
    np.testing.assert_allclose(np.stack(chunked.outputs[2:]), np.stack(whole.outputs), atol=1e-4)


@pytest.mark.parametrize("k", [1, 3])
def test_mtp_cache_holds_only_true_slots(agreeing_model, k):
    """Each round's first MTP call sees a cache rolled back to verified slots only, caught up with
    the main model's true hidden states: its output equals the MTP head run over the final
    sequence in one pass (slot t = hidden t + embedding of token t+1, at position t)."""
    spy = RecordingMTP(agreeing_model)
    firsts, tokens, gen = [], [], mtp_generate_step(
        PROMPT, spy, max_tokens=40, sampler=SamplerSpec(temp=1.0), logits_processors=None, draft_tokens=k)
    mx.random.seed(2)
    for token, _, from_draft in gen:
        if not from_draft:  # the next round starts: its first MTP call is the next one recorded
            firsts.append((len(spy.outputs), PROMPT.size + len(tokens)))
        tokens.append(token)
    full = mx.concatenate([PROMPT, mx.array(tokens, mx.uint32)])
    hidden = agreeing_model.hidden(full[None])
    embed = agreeing_model.embed
    reference = np.array(agreeing_model.mtp(hidden[:, :-1], embed(full[None, 1:])))[0]
    checked = [(spy.outputs[i], reference[pos - 1]) for i, pos in firsts if i < len(spy.outputs)]
    assert len(checked) > 5
    np.testing.assert_allclose(*map(np.stack, zip(*checked)), atol=1e-4)


def test_max_tokens_and_stats_are_exact(agreeing_model):
    for n in (1, 2, 5):
        stats = SpecStats()
        assert len(speculative(agreeing_model, n, 4, stats)) == n
        assert stats.tokens == n - 1 and all(d <= 4 for d in stats.drafted)
    assert "tokens per main-model forward" in str(stats)


def test_errors(random_model, mtp_dir, tmp_path):
    with pytest.raises(ValueError, match="draft_tokens"):
        next(mtp_generate_step(PROMPT, random_model, max_tokens=4, sampler=None, logits_processors=None, draft_tokens=0))
    out, _ = make_checkpoint(tmp_path, seed=5)
    no_mtp, _ = load_model(out)
    with pytest.raises(CheckpointError, match="no MTP head"):
        next(mtp_generate_step(PROMPT, no_mtp, max_tokens=4, sampler=None, logits_processors=None))
