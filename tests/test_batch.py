"""Continuous batching on a tiny float32 checkpoint: a request's greedy tokens in a batch are its
tokens alone, whatever else runs beside it (mixed prompt lengths, joins mid-stream, leaves,
stop strings, logits processors, a cancel), through our engine and through mlx-lm's own
``batch_generate`` on our model."""

from __future__ import annotations

import mlx.core as mx
import pytest
from mlx_lm.generate import batch_generate as mlx_lm_batch_generate
from mlx_lm.sample_utils import make_logits_processors

from mlx_qwenmoe import BatchEngine, batch_generate, generate, generate_step, load, stream_generate
from mlx_qwenmoe.cache import AttentionCache, BatchAttentionCache, DeltaNetCache, restore_caches, snapshot_caches
from tiny_models import make_checkpoint, make_tokenizer

CHUNK = 8  # prefill step: the 70-token prompt joins over 9 engine steps


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model_dir, _ = make_checkpoint(tmp_path_factory.mktemp("tiny_batch"), seed=3, vocab_size=300)
    make_tokenizer(model_dir, vocab_size=300)
    return load(model_dir)


def prompt(n: int, start: int) -> list:
    return [(start + 7 * i) % 250 + 20 for i in range(n)]


def solo(model, tokenizer, ids, max_tokens, **kwargs):
    """(tokens, text, finish_reason) of the request run alone, as stream_generate runs it."""
    responses = list(
        stream_generate(model, tokenizer, ids, max_tokens=max_tokens, prefill_step_size=CHUNK, **kwargs)
    )
    return [r.token for r in responses], "".join(r.text for r in responses), responses[-1].finish_reason


def run(engine):
    """Step until idle: per request (tokens, text, finish_reason, steps it got an event in)."""
    out = {}
    steps = 0
    while engine.has_work():
        steps += 1
        for e in engine.step():
            tokens, texts, _, seen = out.setdefault(e.request_id, ([], [], None, []))
            if e.token is not None:
                tokens.append(e.token)
            texts.append(e.text)
            seen.append(steps)
            out[e.request_id] = (tokens, texts, e.finish_reason, seen)
        assert engine.num_active <= engine.max_batch
    return {i: (t, "".join(x), f, s) for i, (t, x, f, s) in out.items()}


def test_engine_matches_each_request_alone(tiny):
    """Six requests through three slots: lengths 1 to 70, limits 4 to 12, so they leave at
    different steps and the later ones join while others decode."""
    model, tokenizer = tiny
    cases = [(9, 12), (1, 6), (70, 10), (2, 9), (13, 4), (5, 12)]
    engine = BatchEngine(model, tokenizer, max_batch=3, prefill_step_size=CHUNK)
    ids = [engine.submit(prompt(n, 11 * j), max_tokens=m) for j, (n, m) in enumerate(cases)]
    got = run(engine)
    for j, (n, m) in enumerate(cases):
        tokens, text, finish, steps = got[ids[j]]
        assert (tokens, text, finish) == solo(model, tokenizer, prompt(n, 11 * j), m), j
        # one token every step from the first to the last: a joining prompt never stalls it
        assert steps == list(range(steps[0], steps[0] + len(steps)))


def test_stop_strings_processors_samplers_and_cancel(tiny):
    model, tokenizer = tiny
    p_stop, p_pen, p_cancel, p_plain = prompt(6, 4), prompt(11, 2), prompt(4, 3), prompt(20, 4)
    _, full_text, _ = solo(model, tokenizer, p_stop, 16)
    stop = full_text[len(full_text) // 2 : len(full_text) // 2 + 3]
    penalty = make_logits_processors(repetition_penalty=1.5, repetition_context_size=8)
    always_7 = lambda logprobs: mx.full((logprobs.shape[0],), 7, dtype=mx.uint32)  # noqa: E731

    engine = BatchEngine(model, tokenizer, max_batch=4, prefill_step_size=CHUNK)
    i_stop = engine.submit(p_stop, max_tokens=16, stop=[stop])
    i_pen = engine.submit(p_pen, max_tokens=12, logits_processors=penalty)
    i_cancel = engine.submit(p_cancel, max_tokens=50)
    i_plain = engine.submit(p_plain, max_tokens=12, sampler=always_7)
    events = []
    while engine.has_work():
        step = engine.step()
        events += step
        if sum(e.request_id == i_cancel for e in events) == 3:
            assert engine.cancel(i_cancel)
    assert not engine.cancel(i_cancel)

    mine = lambda i: [e for e in events if e.request_id == i]  # noqa: E731
    assert [e.finish_reason for e in mine(i_cancel)] == [None] * 3 + ["cancelled"]
    stopped = mine(i_stop)
    assert "".join(e.text for e in stopped) == solo(model, tokenizer, p_stop, 16, stop=[stop])[1]
    assert stopped[-1].finish_reason == "stop" and len(stopped) < 16
    assert stop not in "".join(e.text for e in stopped)
    pen = [e.token for e in mine(i_pen)]
    assert pen == solo(model, tokenizer, p_pen, 12, logits_processors=penalty)[0]
    assert [e.token for e in mine(i_plain)] == [7] * 12


def test_mlx_lm_batch_generate_runs_our_model(tiny):
    """mlx-lm's BatchGenerator: right-padded prompts prefilled together in chunks (cache
    ``lengths``), rolled to left padding, then batched decode."""
    model, tokenizer = tiny
    prompts = [prompt(n, 5 * n) for n in (7, 2, 23, 4, 1)]
    got = mlx_lm_batch_generate(model, tokenizer, prompts, max_tokens=10, prefill_step_size=CHUNK, return_token_ids=True)
    for p, tokens in zip(prompts, got.token_ids):
        expected, _, finish = solo(model, tokenizer, p, 10)
        assert tokens == (expected[:-1] if finish == "stop" else expected)


def test_left_padded_forward_matches_each_row(tiny):
    """Prompts left-padded into one (B, T) forward: the last logits of every row, and the next
    decode step, are each row's own."""
    model, _ = tiny
    prompts = [prompt(n, n) for n in (12, 3, 8)]
    T = max(map(len, prompts))
    pads = [T - len(p) for p in prompts]
    cache = [
        DeltaNetCache(left_padding=pads) if layer.is_linear else BatchAttentionCache(pads) for layer in model.layers
    ]
    logits = model(mx.array([[0] * pad + p for pad, p in zip(pads, prompts)]), cache=cache)[:, -1]
    for c in cache:
        c.finalize()
    step = model(mx.array([[5], [6], [7]]), cache=cache)[:, -1]
    for r, p in enumerate(prompts):
        alone = model.make_cache()
        ref = model(mx.array([p]), cache=alone)[:, -1]
        assert mx.allclose(logits[r], ref[0], atol=1e-4)
        ref_step = model(mx.array([[5 + r]]), cache=alone)[:, -1]
        assert mx.allclose(step[r], ref_step[0], atol=1e-4)


def test_batch_generate_and_returned_cache(tiny):
    model, tokenizer = tiny
    prompts = [prompt(4, 9), prompt(15, 8), "hello world, the model answers"]
    texts = batch_generate(model, tokenizer, prompts, max_tokens=[5, 7, 6], max_batch=2, prefill_step_size=CHUNK)
    assert texts == [
        generate(model, tokenizer, p, max_tokens=m, prefill_step_size=CHUNK) for p, m in zip(prompts, [5, 7, 6])
    ]

    # a finished request's cache (its prompt and tokens but the last) continues it exactly
    engine = BatchEngine(model, tokenizer, max_batch=2, prefill_step_size=CHUNK)
    first = engine.submit(prompts[0], max_tokens=4, sampler=lambda lp: mx.full((lp.shape[0],), 9, dtype=mx.uint32))
    engine.submit(prompts[1], max_tokens=6)
    done = {}
    while engine.has_work():
        done.update({e.request_id: e for e in engine.step() if e.finish_reason})
    assert done[first].cache is None
    engine.submit(prompts[0], max_tokens=4, return_cache=True)
    while engine.has_work():
        done.update({e.request_id: e for e in engine.step() if e.finish_reason})
    finished = done[max(done)]
    assert {type(c) for c in finished.cache} == {AttentionCache, DeltaNetCache}  # snapshot/restore kept
    history = prompts[0] + [t for t, _ in generate_step(mx.array(prompts[0]), model, max_tokens=4)]
    more = [31, 32, 33]
    expected = [t for t, _ in generate_step(mx.array(history + more), model, max_tokens=5)]
    # ... in the engine (a prompt-cache hit: only the new tokens are prefilled), which updates
    # the cache in place as generate_step does, so it is rolled back before the run alone
    saved = snapshot_caches(finished.cache)
    resumed_id = engine.submit(history[-1:] + more, max_tokens=5, cache=finished.cache)
    assert [e.token for e in run_all(engine) if e.request_id == resumed_id] == expected
    assert finished.cache[-1].offset > saved[-1]
    restore_caches(finished.cache, saved)
    resumed = generate_step(mx.array(history[-1:] + more), model, max_tokens=5, cache=finished.cache)
    assert [t for t, _ in resumed] == expected


def run_all(engine):
    events = []
    while engine.has_work():
        events += engine.step()
    return events


def test_engine_rejects_bad_arguments(tiny):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match="max_batch"):
        BatchEngine(model, tokenizer, max_batch=0)
    engine = BatchEngine(model, tokenizer)
    with pytest.raises(ValueError, match="prompt"):
        engine.submit([])
    with pytest.raises(ValueError, match="max_tokens"):
        engine.submit([1, 2], max_tokens=0)
    with pytest.raises(ValueError, match="max_tokens has 1 entries"):
        batch_generate(model, tokenizer, [[1], [2]], max_tokens=[3])


def test_cancel_while_prefilling_or_waiting(tiny):
    model, tokenizer = tiny
    engine = BatchEngine(model, tokenizer, max_batch=1, prefill_step_size=CHUNK)
    prefilling, waiting = engine.submit(prompt(70, 1), max_tokens=4), engine.submit(prompt(3, 2), max_tokens=4)
    assert engine.step() == [] and (engine.num_active, engine.num_waiting) == (1, 1)
    assert engine.cancel(prefilling) and engine.cancel(waiting)
    assert {(e.request_id, e.token, e.finish_reason) for e in engine.step()} == {
        (prefilling, None, "cancelled"), (waiting, None, "cancelled")
    }
    assert not engine.has_work()
