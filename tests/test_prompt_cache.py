"""The prompt cache: greedy output from a cache hit equals a cold run for every way of reaching
a prompt (tiny random float32 model, and the bundled model with MTP); eviction under a tiny
budget; exact byte accounting with shared prefixes stored once; safetensors round trip in a
new process; mlx-lm's save/load_prompt_cache on our caches; one-line errors for bad files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Sequence

import mlx.core as mx
import pytest
from click.testing import CliRunner
from mlx_lm.models.cache import load_prompt_cache, save_prompt_cache
from mlx_lm.sample_utils import make_logits_processors

from mlx_qwenmoe import generate_step, load, stream_generate
from mlx_qwenmoe.api import chat_prompt_with_boundaries
from mlx_qwenmoe.cli import main
from mlx_qwenmoe.errors import PromptCacheError
from mlx_qwenmoe.loading import load_model
from mlx_qwenmoe.prompt_cache import PromptCache
from tiny_models import make_checkpoint, make_tokenizer

VOCAB = 300
TOKENS = 6
# Qwen3.5's rule: assistant turns before the last user message lose their <think> part.
STRIP_THINKING = (
    "{%- set ns = namespace(last_user=-1) %}"
    "{%- for m in messages %}{%- if m.role == 'user' %}{%- set ns.last_user = loop.index0 %}{%- endif %}{%- endfor %}"
    "{%- for m in messages %}{%- set content = m.content %}"
    "{%- if m.role == 'assistant' and loop.index0 < ns.last_user and '</think>' in content %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}{%- endif %}"
    "{{- '<|im_start|>' + m.role + '\\n' + content + '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n<think>\\n' }}{%- endif %}"
)
SYSTEM = "you are a small model of experts; answer the question with the gated delta attention cache. " * 3


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model_dir, _ = make_checkpoint(tmp_path_factory.mktemp("pc_tiny"), seed=5, vocab_size=VOCAB)
    make_tokenizer(model_dir, vocab_size=VOCAB)
    model, tokenizer = load(model_dir)
    return model_dir, model, tokenizer


def greedy(model, tokenizer, ids: Sequence[int], **kwargs) -> List[int]:
    return [r.token for r in stream_generate(model, tokenizer, list(ids), max_tokens=TOKENS, **kwargs)]


def render(tokenizer, messages: List[Dict[str, str]]):
    return chat_prompt_with_boundaries(tokenizer, messages, chat_template=STRIP_THINKING)


def token_offset(tokenizer, ids: List[int], marker: str) -> int:
    """Tokens up to the end of the first ``marker`` in the decoded ids."""
    text = tokenizer.decode(ids)
    return next(i for i in range(len(ids) + 1) if len(tokenizer.decode(ids[:i])) >= text.index(marker) + len(marker))


def check_exact(model, tokenizer, pc: PromptCache, ids, boundaries=(), mtp=False) -> int:
    """Generates from the cache, asserts the tokens are a cold run's, returns the tokens reused."""
    responses = list(stream_generate(model, tokenizer, ids, max_tokens=TOKENS, prompt_cache=pc, boundaries=boundaries, mtp=mtp))
    assert [r.token for r in responses] == greedy(model, tokenizer, ids)
    assert pc.nbytes <= pc.max_bytes
    check_accounting(pc)
    return responses[0].cached_tokens


def check_accounting(pc: PromptCache) -> None:
    """bytes is the sum of every stored array, and each trie token's KV is stored once."""
    nodes = list(pc._nodes())
    arrays = [a for n in nodes for pair in n.kv + (n.mtp or []) for a in pair]
    arrays += [a for n in nodes for cp in n.checkpoints.values() for pair in cp.states for a in pair]
    arrays += [cp.hidden for n in nodes for cp in n.checkpoints.values() if cp.hidden is not None]
    assert pc.nbytes == sum(a.nbytes for a in arrays)
    plain = [n for n in nodes if n.mtp is None]
    assert sum(n.kv_bytes for n in plain) == pc.kv_bytes_per_token * sum(len(n.tokens) for n in plain)


def test_extension_thinking_stripped_and_edited_message(tiny):
    _, model, tokenizer = tiny
    pc = PromptCache(model, max_bytes=1 << 28, checkpoint_interval=16)
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "hello world, the question"}]
    ids, bounds = render(tokenizer, messages)
    assert check_exact(model, tokenizer, pc, ids, bounds) == 0
    # The next turn: the template drops the earlier turn's thinking, so the sequence diverges
    # right after the assistant turn's opening; the checkpoint where that turn begins is reused.
    messages += [{"role": "assistant", "content": "<think>\nthink fast\n</think>\n\nthe answer"}]
    messages += [{"role": "user", "content": "a question"}]
    ids2, bounds2 = render(tokenizer, messages)
    turn = token_offset(tokenizer, ids2, "<|im_start|>assistant\n")  # the end of that turn's header
    assert turn in bounds2 and ids2[:turn] == ids[:turn] and ids2[turn] != ids[turn]
    assert check_exact(model, tokenizer, pc, ids2, bounds2) == turn
    # One exchange later: all of the last request up to its assistant turn is reused.
    messages += [{"role": "assistant", "content": "small answer"}, {"role": "user", "content": "more"}]
    ids3, bounds3 = render(tokenizer, messages)
    assert check_exact(model, tokenizer, pc, ids3, bounds3) >= bounds2[-1]
    # An edited earlier message: everything before it is reused.
    edited = [dict(m) for m in messages]
    edited[1]["content"] = "hello world, another question"
    ids4, bounds4 = render(tokenizer, edited)
    assert check_exact(model, tokenizer, pc, ids4, bounds4) == token_offset(tokenizer, ids4, "<|im_start|>user\n")
    assert pc.stats()["hits"] == 3


def test_divergence_mid_turn_and_shared_system_prompt(tiny):
    _, model, tokenizer = tiny
    pc = PromptCache(model, max_bytes=1 << 28, checkpoint_interval=16)
    first = tokenizer.encode(SYSTEM + " the time is 10:41")
    check_exact(model, tokenizer, pc, first)
    # Extension by the generated tokens and more: all of it is reused.
    extended = first + greedy(model, tokenizer, first) + tokenizer.encode(" the answer")
    assert check_exact(model, tokenizer, pc, extended) == len(first) + TOKENS
    # The same text with another ending: resumes from the last checkpoint before the divergence.
    second = tokenizer.encode(SYSTEM + " the time is 10:42")
    split = next(i for i, (a, b) in enumerate(zip(first, second)) if a != b)
    reused = check_exact(model, tokenizer, pc, second)
    assert split - 16 < reused <= split
    # Logits processors see the whole prompt, cached part included.
    penalty = dict(logits_processors=make_logits_processors(repetition_penalty=1.5))
    hit = [r.token for r in stream_generate(model, tokenizer, first, max_tokens=TOKENS, prompt_cache=pc, **penalty)]
    assert hit == greedy(model, tokenizer, first, **penalty)
    # That request kept a checkpoint where it left the cached one: the next one resumes there.
    third = tokenizer.encode(SYSTEM + " the time is 10:43")
    assert third[:split] == first[:split] and third[split] not in (first[split], second[split])
    assert check_exact(model, tokenizer, pc, third) == split
    # Two conversations that share only the system prompt.
    for question in ("hello world", "the router layer"):
        ids, bounds = render(tokenizer, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}])
        reused = check_exact(model, tokenizer, pc, ids, bounds)
    assert reused >= bounds[0]
    stats = pc.stats()
    assert stats["entries"] == 5 and stats["hits"] == 5 and stats["tokens_reused"] > 0


def test_eviction_under_a_tiny_budget(tiny):
    _, model, tokenizer = tiny
    one = PromptCache(model, max_bytes=1 << 28).checkpoint_bytes
    pc = PromptCache(model, max_bytes=3 * one, checkpoint_interval=8)
    prompts = [tokenizer.encode(SYSTEM + f" question {i}") for i in range(3)]
    for ids in prompts + prompts[:1]:
        check_exact(model, tokenizer, pc, ids)
    stats = pc.stats()
    assert stats["evictions"] > 0 and stats["checkpoints"] <= 3 and stats["bytes"] <= 3 * one
    with pytest.raises(PromptCacheError, match="max_bytes=100: smaller than one checkpoint"):
        PromptCache(model, max_bytes=100)


def test_disk_round_trip_in_a_new_process(tiny, tmp_path):
    model_dir, model, tokenizer = tiny
    pc = PromptCache(model, max_bytes=1 << 28, checkpoint_interval=16)
    ids = tokenizer.encode(SYSTEM)
    check_exact(model, tokenizer, pc, ids)
    path = tmp_path / "cache.safetensors"
    pc.save(path)
    longer = ids + tokenizer.encode(" and the answer")
    code = (
        "import json; from mlx_qwenmoe import load, stream_generate; from mlx_qwenmoe.prompt_cache import PromptCache\n"
        f"model, tok = load({str(model_dir)!r}); pc = PromptCache.load({str(path)!r}, model); loaded = pc.nbytes\n"
        f"out = [(r.token, r.cached_tokens) for r in stream_generate(model, tok, {longer}, max_tokens={TOKENS}, prompt_cache=pc)]\n"
        "print(json.dumps([loaded, out]))"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    nbytes, pairs = json.loads(run.stdout)
    assert nbytes == pc.nbytes
    assert [t for t, _ in pairs] == greedy(model, tokenizer, longer)
    assert pairs[0][1] == len(ids) - 1  # the checkpoint at the end of the prompt before the last token


def test_bad_files(tiny, tmp_path):
    model_dir, model, tokenizer = tiny
    pc = PromptCache(model, max_bytes=1 << 28)
    check_exact(model, tokenizer, pc, tokenizer.encode(SYSTEM))
    good = tmp_path / "good.safetensors"
    pc.save(good)
    data = good.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    for path in (truncated, garbage, tmp_path / "missing.safetensors"):
        with pytest.raises(PromptCacheError, match=str(path)) as e:
            PromptCache.load(path, model)
        assert "\n" not in str(e.value)
    other_dir, _ = make_checkpoint(tmp_path / "other", seed=6, vocab_size=VOCAB)
    other, _ = load_model(other_dir)
    with pytest.raises(PromptCacheError, match="another model"):
        PromptCache.load(good, other)
    assert PromptCache.load(good, model).stats()["bytes"] == pc.nbytes


def test_mlx_lm_save_and_load_prompt_cache(tiny, tmp_path):
    _, model, tokenizer = tiny
    ids = tokenizer.encode(SYSTEM)
    cache = model.make_cache()
    list(generate_step(mx.array(ids), model, max_tokens=2, cache=cache))
    save_prompt_cache(str(tmp_path / "c.safetensors"), cache)
    loaded = load_prompt_cache(str(tmp_path / "c.safetensors"))
    assert [type(c) for c in loaded] == [type(c) for c in cache]
    more = mx.array(tokenizer.encode(" the answer"))
    assert [t for t, _ in generate_step(more, model, max_tokens=4, cache=loaded)] == [
        t for t, _ in generate_step(more, model, max_tokens=4, cache=cache)
    ]


def test_bundled_model_with_mtp():
    model, tokenizer = load()
    pc = PromptCache(model, max_bytes=1 << 28, checkpoint_interval=32)
    base = tokenizer.encode("def read_config(path):\n    with open(path) as f:\n        return json.load(f)\n" * 4)
    assert check_exact(model, tokenizer, pc, base, mtp=True) == 0
    extended = base + greedy(model, tokenizer, base) + tokenizer.encode("\n\ndef main():\n")
    assert check_exact(model, tokenizer, pc, extended, mtp=True) >= len(base)
    diverged = base[: len(base) // 2] + tokenizer.encode("\nclass Config:\n")
    assert check_exact(model, tokenizer, pc, diverged, mtp=True) > 0
    # A path stored by a plain run gains the MTP head's KV when an MTP run passes over it.
    other = tokenizer.encode("import os\nimport sys\n" * 6)
    check_exact(model, tokenizer, pc, other)
    assert check_exact(model, tokenizer, pc, other + tokenizer.encode("x = 1\n"), mtp=True) == 0
    assert check_exact(model, tokenizer, pc, other + tokenizer.encode("y = 2\n"), mtp=True) > 0


def test_checkpoint_depths_and_boundaries(tiny):
    _, model, tokenizer = tiny
    pc = PromptCache(model, max_bytes=1 << 28, checkpoint_interval=10)
    assert pc.checkpoint_depths(5, 33, boundaries=[3, 12, 33]) == [10, 12, 20, 30, 33]
    assert pc.checkpoint_depths(7, 7) == []
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    ids, bounds = render(tokenizer, messages)
    text = tokenizer.decode(ids)
    assert text == "<|im_start|>system\ns<|im_end|>\n<|im_start|>user\nu<|im_end|>\n<|im_start|>assistant\n<think>\n"
    # where each message, and each message's content, begins; the new assistant turn too
    expected = ["<|im_start|>system\n", "s<|im_end|>\n", "<|im_start|>user\n", "u<|im_end|>\n", "<|im_start|>assistant\n"]
    cuts = [len("".join(expected[: i + 1])) for i in range(len(expected))]
    assert [len(tokenizer.decode(ids[:b])) for b in bounds] == cuts


def test_cli_generate_and_chat_reuse_the_prompt_cache(tiny, tmp_path):
    model_dir = str(tiny[0])
    path = tmp_path / "pc.safetensors"
    args = ["generate", "--model", model_dir, "--prompt", SYSTEM, "--max-tokens", "3", "--prompt-cache", str(path)]
    runs = [CliRunner().invoke(main, args) for _ in range(2)]
    assert all(r.exit_code == 0 for r in runs), runs[0].output
    assert "Prompt cache: 0 prompt tokens reused" in runs[0].output
    assert "Prompt cache: 0 prompt" not in runs[1].output and path.is_file()
    turns = f"hello world\nthe answer\n/save {tmp_path / 'chat.safetensors'}\n/reset\nhello world\n/load {tmp_path / 'bad'}\n"
    chat = CliRunner().invoke(main, ["chat", "--model", model_dir, "--system", SYSTEM, "--temp", "0", "--max-tokens", "3"], input=turns)
    assert chat.exit_code == 0, chat.output
    counts = [line for line in chat.output.splitlines() if line.endswith(" reused")]
    assert len(counts) == 3 and counts[0].endswith(" 0 reused")
    assert not counts[1].endswith(" 0 reused") and not counts[2].endswith(" 0 reused")  # after /reset: the system prompt
    assert (tmp_path / "chat.safetensors").is_file() and f"/load: {tmp_path / 'bad'}: not a readable" in chat.output
    bad = CliRunner().invoke(main, ["chat", "--model", model_dir, "--prompt-cache-bytes", "10"], input="")
    assert bad.exit_code == 2 and "--prompt-cache-bytes 10: smaller than one checkpoint" in bad.output


def test_batch_engine_sequences_resume_from_lookup_and_store(tiny):
    """A server's way through the cache: ``lookup`` a prompt, prefill and decode the rest in a
    ``BatchEngine`` taking the cache's checkpoints on the way, ``store`` the finished sequence.
    The next turn resumes from its end, a diverging prompt from the boundary checkpoint; both
    decode as a cold run does."""
    from mlx_qwenmoe import BatchEngine

    _, model, tokenizer = tiny
    cache = PromptCache(model)
    system = tokenizer.encode(SYSTEM, add_special_tokens=False)
    prompt = system + tokenizer.encode("first question", add_special_tokens=False)
    seen = []  # the history length logits processors get at each step: the cached tokens count too

    def record(history, logits):
        seen.append(len(history))
        return logits

    def cold(ids):
        return greedy(model, tokenizer, ids)

    def run(ids):
        hit = cache.lookup(ids)
        kinds = cache.prefill_checkpoints(hit, len(ids), [len(system)])
        taken = {}

        def on_checkpoint(n, c):
            taken[hit.depth + n] = cache.snapshot(c, kinds[hit.depth + n])

        engine = BatchEngine(model, tokenizer, max_batch=2, prefill_step_size=64)
        engine.submit(ids[hit.depth :], max_tokens=TOKENS, cache=hit.cache, return_cache=True,
                      checkpoints=[d - hit.depth for d in kinds], on_checkpoint=on_checkpoint,
                      logits_processors=[record], context=ids[: hit.depth])
        events = [e for _ in range(8 * TOKENS) for e in engine.step()]
        assert sorted(taken) == sorted(kinds)
        assert seen[: len(events)] == list(range(len(ids), len(ids) + len(events)))
        seen.clear()
        cache.store(ids + [e.token for e in events][:-1], events[-1].cache, taken)
        return hit.depth, [e.token for e in events]

    depth, answer = run(prompt)
    assert depth == 0 and answer == cold(prompt)
    follow = prompt + answer + tokenizer.encode(" second question", add_special_tokens=False)
    assert run(follow) == (len(prompt) + len(answer) - 1, cold(follow))
    other = system + tokenizer.encode("another question", add_special_tokens=False)
    assert run(other) == (len(system), cold(other))
