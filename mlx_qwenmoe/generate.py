"""Text generation: chunked prefill, then one token per step, streamed as text with running stats.

The conventions are mlx-lm's (``generate_step`` / ``stream_generate`` / ``generate``,
``GenerationResponse``, samplers that take log-probabilities, logits processors that take
the token history), so code written against mlx-lm's API runs against ours.
"""

from __future__ import annotations

import operator
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import GenerationResponse as _MlxLmResponse
from mlx_lm.generate import wired_limit
from mlx_lm.sample_utils import greedy_sampler
from mlx_lm.tokenizer_utils import TokenizerWrapper
from tqdm import tqdm

from .model import check_token_ids

from .sampling import LogitsProcessor, Sampler, log_probs

__all__ = [
    "GenerationResponse",
    "StopStrings",
    "TokenText",
    "chunk_spans",
    "format_stats",
    "generate",
    "generate_step",
    "prefill",
    "stream_generate",
]


PROGRESS_MIN_TOKENS = 4096  # shorter prompts are done before a bar would be read


@dataclass
class GenerationResponse(_MlxLmResponse):
    """mlx-lm's response, plus how many prompt tokens a prompt cache supplied."""

    cached_tokens: int = 0


CheckpointHook = Callable[[int, mx.array], None]


def chunk_spans(n: int, step: int, breaks: Iterable[int] = ()) -> List[Tuple[int, int]]:
    """[start, end) spans of at most ``step`` tokens covering ``n`` tokens, cut at every
    position of ``breaks`` inside (0, n) so a caller can snapshot the state there."""
    if step < 1:
        raise ValueError(f"prefill_step_size must be at least 1, not {step}")
    cuts = sorted({b for b in breaks if 0 < b < n} | {n})
    spans, start = [], 0
    for cut in cuts if n else ():
        while start < cut:
            spans.append((start, min(start + step, cut)))
            start = spans[-1][1]
    return spans


def prefill(
    model: nn.Module,
    tokens: mx.array,
    cache: List[Any],
    prefill_step_size: int = 2048,
    checkpoints: Iterable[int] = (),
    on_checkpoint: Optional[CheckpointHook] = None,
    progress: bool = False,
) -> None:
    """Run ``tokens`` (1-D) into ``cache``, ``prefill_step_size`` tokens at a time.

    Only the hidden states are asked for, and evaluating the cache state after each chunk
    lets MLX free that chunk's activations, so peak memory is the caches plus one chunk
    whatever the prompt length. Chunks also end at each of ``checkpoints`` (positions in
    ``tokens``); ``on_checkpoint(end, last_hidden)`` is called at every chunk end. ``progress``
    shows a bar on stderr for prompts of at least ``PROGRESS_MIN_TOKENS`` tokens.
    """
    spans = chunk_spans(tokens.size, prefill_step_size, checkpoints)
    show = progress and tokens.size >= PROGRESS_MIN_TOKENS
    with tqdm(total=tokens.size, unit="tok", desc="prefill", disable=not show, file=sys.stderr, leave=False) as bar:
        for start, end in spans:
            hidden = model.hidden(tokens[None, start:end], cache)
            mx.eval([c.state for c in cache])
            if on_checkpoint is not None:
                on_checkpoint(end, hidden[:, -1:])
            mx.clear_cache()
            bar.update(end - start)


def generate_step(
    prompt: mx.array,
    model: nn.Module,
    *,
    max_tokens: int = 256,
    sampler: Optional[Sampler] = None,
    logits_processors: Optional[List[LogitsProcessor]] = None,
    prefill_step_size: int = 2048,
    cache: Optional[List[Any]] = None,
    checkpoints: Iterable[int] = (),
    on_checkpoint: Optional[CheckpointHook] = None,
    context: Optional[mx.array] = None,
    prefill_progress: bool = False,
) -> Iterator[Tuple[int, mx.array]]:
    """Yield up to ``max_tokens`` (token, log-probabilities over the vocabulary) pairs.

    ``cache`` (from ``model.make_cache()``) is updated in place; once a token has been
    yielded the cache holds the prompt and every token yielded so far, so a caller can
    continue a conversation from it. ``checkpoints``/``on_checkpoint`` go to ``prefill``;
    ``context``: the tokens ``cache`` already holds, which logits processors see before ``prompt``.
    """
    if prompt.ndim != 1 or prompt.size == 0:
        raise ValueError(f"prompt must be a non-empty 1-D array of token ids, got shape {tuple(prompt.shape)}")
    check_token_ids(prompt, model.args.vocab_size)
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be at least 1, not {max_tokens}")
    sampler = sampler or greedy_sampler
    cache = model.make_cache() if cache is None else cache
    history = prompt if context is None else mx.concatenate([context, prompt])

    def step(tokens: mx.array) -> Tuple[mx.array, mx.array]:
        # Sampled ids are in the vocabulary by construction: no per-token check (it would sync).
        logits = model.logits(model.hidden(tokens[None], cache))[:, -1, :]
        logprobs = log_probs(logits, history, logits_processors or ())
        return sampler(logprobs), logprobs.squeeze(0)

    prefill(model, prompt[:-1], cache, prefill_step_size, checkpoints, on_checkpoint, prefill_progress)
    y, logprobs = step(prompt[-1:])
    mx.async_eval(y, logprobs)
    for n in range(max_tokens):
        # Queue the next step before handing this token out, so the device works while
        # the caller detokenizes; it also puts y in the cache before anyone sees it.
        if logits_processors:
            history = mx.concatenate([history, y])
        next_y, next_logprobs = step(y)
        mx.async_eval(next_y, next_logprobs)
        yield y.item(), logprobs
        if n % 256 == 255:
            mx.clear_cache()
        y, logprobs = next_y, next_logprobs


class StopStrings:
    """Cuts streamed text at the first stop string, holding back any tail that could still
    become one, so a stop string is never shown (not even its first characters)."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, text: str) -> Tuple[str, bool]:
        """The text safe to show now, and whether a stop string was reached."""
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        keep = max(
            (k for s in self.stops for k in range(1, len(s)) if self.pending.endswith(s[:k])),
            default=0,
        )
        cut = len(self.pending) - keep
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


def prompt_token_ids(tokenizer: Any, text: str) -> List[int]:
    """A text prompt's ids as mlx-lm makes them: the tokenizer's special tokens are added
    unless the text already starts with BOS."""
    bos = tokenizer.bos_token
    return tokenizer.encode(text, add_special_tokens=bos is None or not text.startswith(bos))
class TokenText:
    """One request's tokens as streamed text: the delta each token adds, without EOS tokens or
    stop strings, and the finish reason ("stop": EOS or a stop string, "length": ``max_tokens``)."""

    def __init__(self, tokenizer: TokenizerWrapper, max_tokens: int, stop: Sequence[str] = ()):
        self.detokenizer = tokenizer.detokenizer  # a fresh copy per request
        self.stops = StopStrings(stop)
        self.eos = tokenizer.eos_token_ids
        self.max_tokens = max_tokens
        self.count = 0

    def add(self, token: int) -> Tuple[str, Optional[str]]:
        self.count += 1
        finish_reason = None
        if token in self.eos:
            finish_reason = "stop"
        else:
            self.detokenizer.add_token(token)
            if self.count == self.max_tokens:
                finish_reason = "length"
        if finish_reason:
            self.detokenizer.finalize()
        text, hit = self.stops.feed(self.detokenizer.last_segment)
        if hit:
            finish_reason = "stop"
        elif finish_reason:
            text += self.stops.flush()
        return text, finish_reason


def _prompt_ids(tokenizer: TokenizerWrapper, prompt: Union[str, Sequence[int], mx.array]) -> mx.array:
    if isinstance(prompt, mx.array):
        return prompt
    if isinstance(prompt, (bytes, bytearray)):
        raise ValueError("prompt must be text (str) or token ids, not bytes")
    if isinstance(prompt, str):
        prompt = prompt_token_ids(tokenizer, prompt)
    try:
        ids = [operator.index(t) for t in prompt]
    except TypeError:
        raise ValueError("prompt must be text or a sequence of integer token ids") from None
    bad = next((t for t in ids if not 0 <= t < 2**31), None)
    if bad is not None:
        raise ValueError(f"token id {bad} is outside the vocabulary")
    return mx.array(ids, dtype=mx.uint32)


def _checked_prompt(model: nn.Module, tokenizer: TokenizerWrapper, prompt: Any, max_tokens: int) -> mx.array:
    """The prompt's ids, checked against the vocabulary; a warning when the generation would run
    past the positions the model was trained on."""
    prompt = _prompt_ids(tokenizer, prompt)
    check_token_ids(prompt, model.args.vocab_size)
    limit = model.args.max_position_embeddings
    if prompt.size + max_tokens > limit:
        warnings.warn(
            f"the prompt ({prompt.size} tokens) plus max_tokens ({max_tokens}) run past the model's "
            f"max_position_embeddings ({limit}); output beyond it may degrade",
            stacklevel=3,
        )
    return prompt


def stream_generate(
    model: nn.Module,
    tokenizer: Any,
    prompt: Union[str, Sequence[int], mx.array],
    max_tokens: int = 256,
    *,
    sampler: Optional[Sampler] = None,
    logits_processors: Optional[List[LogitsProcessor]] = None,
    prefill_step_size: int = 2048,
    cache: Optional[List[Any]] = None,
    stop: Sequence[str] = (),
    mtp: bool = False,
    draft_tokens: int = 2,
    mtp_stats: Optional[Any] = None,
    prompt_cache: Optional[Any] = None,
    boundaries: Sequence[int] = (),
    prefill_progress: bool = False,
) -> Iterator[GenerationResponse]:
    """Yield one ``GenerationResponse`` per generated token, the last with ``finish_reason``
    "stop" (an EOS token of the checkpoint or a ``stop`` string) or "length".

    ``text`` never contains the EOS token or a stop string. ``mtp`` drafts ``draft_tokens``
    tokens ahead with the checkpoint's multi-token-prediction head and verifies them;
    ``mtp_stats`` (a ``speculative.SpecStats``) then collects acceptance counts.

    ``prompt_cache`` (a ``prompt_cache.PromptCache``) supplies the longest cached prefix of
    the prompt and takes the prompt and the generated tokens back; ``boundaries`` are the
    token offsets where chat messages begin (``api.chat_prompt_with_boundaries``), where it
    also keeps a checkpoint. Each response's ``cached_tokens`` says how many prompt tokens
    it supplied.
    ``prefill_progress``: a progress bar on stderr for long prompts (without ``mtp``).
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be at least 1, not {max_tokens}")
    if not isinstance(tokenizer, TokenizerWrapper):
        tokenizer = TokenizerWrapper(tokenizer)
    prompt = _checked_prompt(model, tokenizer, prompt, max_tokens)
    options = dict(
        max_tokens=max_tokens,
        sampler=sampler,
        logits_processors=logits_processors,
        prefill_step_size=prefill_step_size,
    )
    if prompt_cache is not None:
        if cache is not None:
            raise ValueError("give cache or prompt_cache, not both")
        cached, tokens = prompt_cache.generate_tokens(
            prompt, boundaries, mtp=mtp, draft_tokens=draft_tokens, mtp_stats=mtp_stats, **options
        )
    else:
        cached, tokens = 0, _tokens(model, prompt, cache, mtp, draft_tokens, mtp_stats, prefill_progress, options)
    try:
        yield from _responses(tokenizer, tokens, prompt.size, cached, max_tokens, stop, model)
    finally:
        # Ends the token stream now, so a prompt cache takes the tokens back before we return.
        tokens.close()


def _tokens(
    model: nn.Module, prompt: mx.array, cache: Optional[List[Any]], mtp: bool, draft_tokens: int,
    mtp_stats: Optional[Any], prefill_progress: bool, options: dict,
) -> Iterator[Tuple[int, mx.array, bool]]:
    """(token, logprobs, from_draft) of a generation without a prompt cache."""
    if not mtp:
        steps = generate_step(prompt, model, cache=cache, prefill_progress=prefill_progress, **options)
        return ((t, lp, False) for t, lp in steps)
    if cache is not None:
        raise ValueError("mtp=True does not continue from a given cache")
    from .speculative import mtp_generate_step

    return mtp_generate_step(prompt, model, draft_tokens=draft_tokens, stats=mtp_stats, **options)


def _responses(
    tokenizer: TokenizerWrapper,
    tokens: Iterator[Tuple[int, mx.array, bool]],
    prompt_size: int,
    cached: int,
    max_tokens: int,
    stop: Sequence[str],
    model: nn.Module,
) -> Iterator[GenerationResponse]:
    """Detokenize (token, logprobs, from_draft) triples into responses, stopping at EOS or a stop string."""
    text_stream = TokenText(tokenizer, max_tokens, stop)
    tic = time.perf_counter()
    prompt_tps = 0.0
    # Keeps the weights wired on Apple silicon, as mlx-lm does (a no-op elsewhere).
    with wired_limit(model):
        for n, (token, logprobs, from_draft) in enumerate(tokens):
            if n == 0:
                prompt_tps = (prompt_size - cached) / (time.perf_counter() - tic)
                tic = time.perf_counter()
            text, finish_reason = text_stream.add(token)
            yield GenerationResponse(
                text=text,
                token=token,
                logprobs=logprobs,
                from_draft=from_draft,
                prompt_tokens=prompt_size,
                prompt_tps=prompt_tps,
                generation_tokens=n + 1,
                generation_tps=(n + 1) / (time.perf_counter() - tic),
                peak_memory=mx.get_peak_memory() / 1e9,
                finish_reason=finish_reason,
                cached_tokens=cached,
            )
            if finish_reason:
                return


def format_stats(response: GenerationResponse) -> str:
    """The one-line summary printed after a generation."""
    return (
        f"Prompt: {response.prompt_tokens} tokens, {response.prompt_tps:.1f} tokens/s | "
        f"Generation: {response.generation_tokens} tokens, {response.generation_tps:.1f} tokens/s | "
        f"Peak memory: {response.peak_memory:.3f} GB"
    )


def generate(
    model: nn.Module,
    tokenizer: Any,
    prompt: Union[str, Sequence[int], mx.array],
    *,
    verbose: bool = False,
    **kwargs: Any,
) -> str:
    """The whole generated text; ``kwargs`` go to ``stream_generate``. ``verbose`` streams
    the text to stdout and ends with the stats line, as mlx-lm does."""
    pieces = []
    response = None
    for response in stream_generate(model, tokenizer, prompt, **kwargs):
        pieces.append(response.text)
        if verbose:
            print(response.text, end="", flush=True)
    if verbose and response is not None:
        print()
        print(format_stats(response))
    return "".join(pieces)
