"""The Python generation API against the transformers reference on a tiny checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mlx.core as mx
from mlx_lm.sample_utils import make_sampler

from mlx_qwenmoe import generate, generate_step, load, stream_generate
from mlx_qwenmoe.api import chat_prompt
from mlx_qwenmoe.errors import ModelNotFoundError
from mlx_qwenmoe.generate import StopStrings
from tiny_models import make_checkpoint, make_tokenizer, reference_logits

VOCAB = 300
PROMPT = "hello world, the model answers the question"


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory):
    """(directory, transformers model, model, tokenizer, added-token ids), built once."""
    model_dir, ref = make_checkpoint(tmp_path_factory.mktemp("tiny_lm"), seed=3, vocab_size=VOCAB)
    ids = make_tokenizer(model_dir, vocab_size=VOCAB)
    model, tokenizer = load(model_dir)  # a Path, as well as a str, is accepted
    return model_dir, ref, model, tokenizer, ids


def reference_greedy(ref, prompt_ids, n):
    """transformers' own greedy decoding (the tiny config has no eos id, so it runs n steps)."""
    with torch.no_grad():
        out = ref.generate(torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=n)
    return out[0, len(prompt_ids):].tolist()


def test_load_reads_eos_ids_and_chat_template(tiny_lm):
    _, _, _, tokenizer, ids = tiny_lm
    assert tokenizer.eos_token_ids == {ids["<|im_end|>"], ids["<|endoftext|>"]}
    assert tokenizer.has_chat_template


def test_greedy_matches_transformers(tiny_lm):
    _, ref, model, tokenizer, ids = tiny_lm
    prompt = tokenizer.encode(PROMPT)
    expected = reference_greedy(ref, prompt, 12)
    got = [t for t, _ in generate_step(mx.array(prompt), model, max_tokens=12)]
    assert got == expected

    eos = {ids["<|im_end|>"], ids["<|endoftext|>"]}
    end = next((i + 1 for i, t in enumerate(expected) if t in eos), len(expected))
    streamed = [r.token for r in stream_generate(model, tokenizer, PROMPT, max_tokens=12)]
    assert streamed == expected[:end]
    text = generate(model, tokenizer, PROMPT, max_tokens=12)
    assert text == tokenizer.decode([t for t in expected[:end] if t not in eos])


def test_response_fields(tiny_lm):
    _, _, model, tokenizer, _ = tiny_lm
    always = lambda logprobs: mx.array([7])  # noqa: E731  never an eos id
    responses = list(stream_generate(model, tokenizer, PROMPT, max_tokens=5, sampler=always))
    assert [r.generation_tokens for r in responses] == [1, 2, 3, 4, 5]
    assert [r.finish_reason for r in responses] == [None] * 4 + ["length"]
    last = responses[-1]
    assert last.prompt_tokens == len(tokenizer.encode(PROMPT))
    assert last.prompt_tps > 0 and last.generation_tps > 0 and last.peak_memory > 0
    assert last.logprobs.shape == (VOCAB,)
    assert abs(float(mx.logsumexp(last.logprobs))) < 1e-4
    assert not last.from_draft


def test_seeded_sampling_is_reproducible(tiny_lm):
    _, _, model, tokenizer, _ = tiny_lm

    def sample(seed):
        mx.random.seed(seed)
        sampler = make_sampler(temp=1.5, top_p=0.95, top_k=50)
        return [t for t, _ in generate_step(mx.array(tokenizer.encode(PROMPT)), model, max_tokens=8, sampler=sampler)]

    first = sample(11)
    assert sample(11) == first
    assert sample(12) != first


def test_eos_stops_without_showing_it(tiny_lm):
    _, _, model, tokenizer, ids = tiny_lm
    script = iter([10, 11, ids["<|im_end|>"], 12])
    sampler = lambda logprobs: mx.array([next(script)])  # noqa: E731
    responses = list(stream_generate(model, tokenizer, PROMPT, max_tokens=10, sampler=sampler))
    assert [r.token for r in responses] == [10, 11, ids["<|im_end|>"]]
    assert responses[-1].finish_reason == "stop"
    assert "".join(r.text for r in responses) == tokenizer.decode([10, 11])


def test_stop_strings(tiny_lm):
    _, _, model, tokenizer, _ = tiny_lm
    full = generate(model, tokenizer, PROMPT, max_tokens=24, sampler=make_sampler(0.0))
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    assert len(stop) == 2
    responses = list(stream_generate(model, tokenizer, PROMPT, max_tokens=24, stop=["never-there", stop]))
    assert "".join(r.text for r in responses) == full[: full.find(stop)]
    assert responses[-1].finish_reason == "stop"


def test_stop_strings_hold_back_a_possible_start():
    stops = StopStrings(["</s>", "END"])
    assert stops.feed("ab") == ("ab", False)
    assert stops.feed("c<") == ("c", False)
    assert stops.feed("/") == ("", False)
    assert stops.feed("x E") == ("</x ", False)
    assert stops.feed("N") == ("", False)
    assert stops.feed("D tail") == ("", True)
    assert StopStrings([]).feed("anything") == ("anything", False)


def test_chat_template_multi_turn(tiny_lm):
    _, _, _, tokenizer, _ = tiny_lm
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "hello world"},
        {"role": "user", "content": "a question"},
    ]
    turns = (
        "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhello<|im_end|>\n"
        "<|im_start|>assistant\nhello world<|im_end|>\n<|im_start|>user\na question<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert tokenizer.decode(chat_prompt(tokenizer, messages, enable_thinking=False)) == turns + "<think>\n\n</think>\n\n"
    # The demo template leaves the turn open when thinking is on (the model decides whether to think).
    assert tokenizer.decode(chat_prompt(tokenizer, messages, enable_thinking=True)) == turns
    assert chat_prompt(tokenizer, messages)[: len(tokenizer.encode(turns))] == tokenizer.encode(turns)


def test_chunked_prefill_equals_one_shot(tiny_lm):
    _, ref, model, tokenizer, _ = tiny_lm
    prompt = mx.array(tokenizer.encode(PROMPT * 2))
    assert prompt.size > 3 * 7

    def first_steps(step):
        return list(generate_step(prompt, model, max_tokens=3, prefill_step_size=step))

    chunked, one_shot = first_steps(7), first_steps(4096)
    assert [t for t, _ in chunked] == [t for t, _ in one_shot]
    for (_, a), (_, b) in zip(chunked, one_shot):
        np.testing.assert_allclose(np.array(a), np.array(b), atol=1e-4)
    expected = reference_logits(ref, np.array(prompt)[None])[0, -1]
    expected = expected - np.log(np.exp(expected - expected.max()).sum()) - expected.max()
    np.testing.assert_allclose(np.array(chunked[0][1]), expected, atol=1e-3)


def test_prefill_peak_memory_does_not_grow_with_prompt(tiny_lm):
    _, _, model, _, _ = tiny_lm

    def prefill_overhead(length, step):
        """Peak memory during prefill beyond what stays allocated after it, and the KV bytes."""
        cache = model.make_cache()
        mx.synchronize()
        mx.clear_cache()
        mx.reset_peak_memory()
        next(generate_step(mx.arange(length) % VOCAB, model, max_tokens=1, prefill_step_size=step, cache=cache))
        mx.synchronize()
        kv_bytes = sum(c.keys.nbytes + c.values.nbytes for c in cache if hasattr(c, "keys"))
        return mx.get_peak_memory() - mx.get_active_memory(), kv_bytes

    short, _ = prefill_overhead(128, 64)
    long, kv_bytes = prefill_overhead(512, 64)
    one_shot, _ = prefill_overhead(512, 4096)
    # A growing KV cache is copied when it grows: that transient is the caches' own.
    assert long < short + kv_bytes, (short, long, kv_bytes)
    assert one_shot > 4 * long, (long, one_shot)


def test_cache_continues_a_conversation(tiny_lm):
    _, _, model, tokenizer, _ = tiny_lm
    first, second = tokenizer.encode(PROMPT), tokenizer.encode(" the answer")
    cache = model.make_cache()
    generated = [t for t, _ in generate_step(mx.array(first), model, max_tokens=4, cache=cache)]
    continued = [t for t, _ in generate_step(mx.array(second), model, max_tokens=4, cache=cache)]
    fresh = [t for t, _ in generate_step(mx.array(first + generated + second), model, max_tokens=4)]
    assert continued == fresh


def test_bad_arguments(tiny_lm):
    _, _, model, tokenizer, _ = tiny_lm
    with pytest.raises(ValueError, match="max_tokens"):
        next(stream_generate(model, tokenizer, PROMPT, max_tokens=-1))
    with pytest.raises(ValueError, match="prompt"):
        next(generate_step(mx.array([], dtype=mx.uint32), model))
    with pytest.raises(ValueError, match="prefill_step_size"):
        next(generate_step(mx.array([1, 2]), model, prefill_step_size=0))
    with pytest.raises(ModelNotFoundError, match="/no/such/model"):
        load("/no/such/model")
