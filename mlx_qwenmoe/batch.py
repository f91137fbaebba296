"""Continuous batching: many requests decode together, one batched forward pass per step.

``BatchEngine`` is driven from one thread: ``submit`` queues a request, ``step`` advances
every request by at most one token and returns what happened, ``cancel`` drops one.
Requests join and leave between steps. A new request's prompt is prefilled on its own, in
chunks of ``prefill_step_size`` tokens, one chunk per step, so running streams wait at most
one chunk; once its prompt (all but the last token) is in, its caches join the batch's
(mlx-lm's ``BatchKVCache`` for attention, left-padded, and the DeltaNet states stacked) and
its last prompt token goes into the next batched decode step. Every request keeps its own
sampler, logits processors, stop strings and token limit, so greedy output in a batch is
the output alone up to floating-point reduction order.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Deque, Dict, List, Optional, Sequence, Union

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.sample_utils import greedy_sampler
from mlx_lm.tokenizer_utils import TokenizerWrapper

from .generate import TokenText, _prompt_ids
from .sampling import LogitsProcessor, Sampler

__all__ = ["BatchEngine", "BatchEvent", "batch_generate"]


@dataclass
class BatchEvent:
    """What one step did to one request. ``token`` is None only for "cancelled"; ``cache``
    is the request's caches (prompt and generated tokens but the last) when it finished
    and was submitted with ``return_cache``."""

    request_id: int
    token: Optional[int]
    text: str
    finish_reason: Optional[str] = None
    logprobs: Optional[mx.array] = None
    cache: Optional[List[Any]] = None


@dataclass
class _Request:
    id: int
    prompt: List[int]
    sampler: Sampler
    logits_processors: List[LogitsProcessor]
    text: TokenText
    cache: List[Any]
    return_cache: bool
    prefilled: int = 0  # prompt tokens already in ``cache`` (all but the last go in by prefill)
    next_input: int = 0
    history: Optional[mx.array] = None
    cancelled: bool = False
    checkpoints: Sequence[int] = ()
    on_checkpoint: Optional[Callable[[int, List[Any]], None]] = None


class BatchEngine:
    """Continuous batching over ``model`` (our ``Model``, or any mlx-lm model whose caches
    implement mlx-lm's batch protocol). At most ``max_batch`` requests are prefilling or
    decoding at once; the rest wait in submission order."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        *,
        max_batch: int = 8,
        prefill_step_size: int = 512,
    ):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, not {max_batch}")
        if prefill_step_size < 1:
            raise ValueError(f"prefill_step_size must be at least 1, not {prefill_step_size}")
        self.model = model
        self.tokenizer = tokenizer if isinstance(tokenizer, TokenizerWrapper) else TokenizerWrapper(tokenizer)
        self.max_batch = max_batch
        self.prefill_step_size = prefill_step_size
        self._ids = itertools.count()
        self._waiting: Deque[_Request] = deque()
        self._prefilling: Optional[_Request] = None
        self._rows: List[_Request] = []
        self._cache: Optional[List[Any]] = None  # the running rows' caches, batched

    @property
    def num_waiting(self) -> int:
        """Requests submitted but not yet started (what a server's queue bound applies to)."""
        return len(self._waiting)

    @property
    def num_active(self) -> int:
        """Requests prefilling or decoding."""
        return len(self._rows) + (self._prefilling is not None)

    def has_work(self) -> bool:
        return bool(self._waiting or self._prefilling or self._rows)

    def submit(
        self,
        prompt: Union[str, Sequence[int], mx.array],
        *,
        max_tokens: int = 256,
        sampler: Optional[Sampler] = None,
        logits_processors: Optional[List[LogitsProcessor]] = None,
        stop: Sequence[str] = (),
        cache: Optional[List[Any]] = None,
        return_cache: bool = False,
        checkpoints: Sequence[int] = (),
        on_checkpoint: Optional[Callable[[int, List[Any]], None]] = None,
        context: Sequence[int] = (),
    ) -> int:
        """Queue a request; returns its id. ``cache`` (single-sequence caches, e.g. a prompt
        cache entry) already holds the tokens before ``prompt``; ``prompt`` is what follows.
        The engine updates ``cache`` in place, as ``generate_step`` does: snapshot it to reuse it.
        ``on_checkpoint(n, cache)`` is called once the first ``n`` tokens of ``prompt`` are
        prefilled, for each ``n`` in ``checkpoints`` (prefill chunks end there). ``context``:
        the tokens ``cache`` already holds, which logits processors see before ``prompt``."""
        ids = _prompt_ids(self.tokenizer, prompt).tolist()
        if not ids:
            raise ValueError("prompt must hold at least one token")
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, not {max_tokens}")
        request = _Request(
            id=next(self._ids),
            prompt=ids,
            sampler=sampler or greedy_sampler,
            logits_processors=list(logits_processors or ()),
            text=TokenText(self.tokenizer, max_tokens, stop),
            cache=self.model.make_cache() if cache is None else cache,
            return_cache=return_cache,
            checkpoints=sorted(checkpoints),
            on_checkpoint=on_checkpoint,
        )
        if request.logits_processors:
            request.history = mx.array([*context, *ids], dtype=mx.uint32)
        self._waiting.append(request)
        return request.id

    def cancel(self, request_id: int) -> bool:
        """Stop a request; the next ``step`` reports it with finish_reason "cancelled".
        Returns False when no unfinished request has this id."""
        for request in self._all():
            if request.id == request_id and not request.cancelled:
                request.cancelled = True
                return True
        return False

    def step(self) -> List[BatchEvent]:
        """At most one prefill chunk for a joining request, then one decode step for the batch."""
        events = self._drop_cancelled()
        if self._prefilling is None and self._waiting and len(self._rows) < self.max_batch:
            self._prefilling = self._waiting.popleft()
        if self._prefilling is not None:
            self._prefill_chunk(self._prefilling)
        if self._rows:
            events += self._decode()
        return events

    def _all(self) -> List[_Request]:
        return [*self._waiting, *([self._prefilling] if self._prefilling else []), *self._rows]

    def _drop_cancelled(self) -> List[BatchEvent]:
        dropped = [r for r in self._all() if r.cancelled]
        if not dropped:
            return []
        self._waiting = deque(r for r in self._waiting if not r.cancelled)
        if self._prefilling is not None and self._prefilling.cancelled:
            self._prefilling = None
        self._keep_rows([i for i, r in enumerate(self._rows) if not r.cancelled])
        return [BatchEvent(r.id, None, "", "cancelled") for r in dropped]

    def _prefill_chunk(self, request: _Request) -> None:
        """One chunk of the prompt (all but its last token); the request joins the batch after
        the chunk that completes it, as ``generate.prefill`` would have split it alone."""
        end = min(len(request.prompt) - 1, request.prefilled + self.prefill_step_size,
                  *(n for n in request.checkpoints if n > request.prefilled))
        if end > request.prefilled:
            chunk = mx.array(request.prompt[request.prefilled : end], dtype=mx.uint32)
            self.model.hidden(chunk[None], request.cache)
            mx.eval([c.state for c in request.cache])
            request.prefilled = end
            if request.on_checkpoint is not None and end in request.checkpoints:
                request.on_checkpoint(end, request.cache)
        if request.prefilled == len(request.prompt) - 1:
            self._join(request)
            self._prefilling = None

    def _join(self, request: _Request) -> None:
        merged = [type(c).merge([c]) for c in request.cache]
        for c in merged:
            # merge marks empty states as left-padded; nothing is padded in a one-row batch
            c.finalize()
        if self._cache is None:
            self._cache = merged
        else:
            for batch, row in zip(self._cache, merged):
                batch.extend(row)
        request.cache = []
        request.next_input = request.prompt[-1]
        self._rows.append(request)

    def _keep_rows(self, keep: List[int]) -> None:
        if len(keep) == len(self._rows):
            return
        self._rows = [self._rows[i] for i in keep]
        if not keep:
            self._cache = None
            return
        for c in self._cache:
            c.filter(keep)

    def _decode(self) -> List[BatchEvent]:
        inputs = mx.array([[r.next_input] for r in self._rows], dtype=mx.uint32)
        logits = self.model(inputs, cache=self._cache)[:, -1, :]
        logprobs = self._logprobs(logits)
        tokens = self._sample(logprobs)
        mx.eval(tokens, logprobs)
        events, keep = [], []
        for i, (request, token) in enumerate(zip(self._rows, tokens.tolist())):
            text, finish_reason = request.text.add(token)
            request.next_input = token
            if request.history is not None:
                request.history = mx.concatenate([request.history, mx.array([token], dtype=mx.uint32)])
            cache = None
            if finish_reason and request.return_cache:
                cache = [c.extract(i) for c in self._cache]
            events.append(BatchEvent(request.id, token, text, finish_reason, logprobs[i], cache))
            if finish_reason is None:
                keep.append(i)
        self._keep_rows(keep)
        return events

    def _logprobs(self, logits: mx.array) -> mx.array:
        if any(r.logits_processors for r in self._rows):
            rows = []
            for i, r in enumerate(self._rows):
                row = logits[i : i + 1]
                for processor in r.logits_processors:
                    row = processor(r.history, row)
                rows.append(row)
            logits = mx.concatenate(rows, axis=0)
        return logits - mx.logsumexp(logits, axis=-1, keepdims=True)

    def _sample(self, logprobs: mx.array) -> mx.array:
        """One sampler call per distinct sampler, on all the rows that share it."""
        groups: Dict[int, List[int]] = {}
        for i, r in enumerate(self._rows):
            groups.setdefault(id(r.sampler), []).append(i)
        if len(groups) == 1:
            return self._rows[0].sampler(logprobs).reshape(-1)
        tokens = [None] * len(self._rows)
        for rows in groups.values():
            sampled = self._rows[rows[0]].sampler(logprobs[mx.array(rows)]).reshape(-1)
            for j, i in enumerate(rows):
                tokens[i] = sampled[j : j + 1]
        return mx.concatenate(tokens)


def batch_generate(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[Union[str, Sequence[int], mx.array]],
    *,
    max_tokens: Union[int, Sequence[int]] = 256,
    sampler: Optional[Sampler] = None,
    logits_processors: Optional[List[LogitsProcessor]] = None,
    stop: Sequence[str] = (),
    max_batch: int = 8,
    prefill_step_size: int = 512,
) -> List[str]:
    """The generated text for each prompt, decoded ``max_batch`` at a time in one batch."""
    engine = BatchEngine(model, tokenizer, max_batch=max_batch, prefill_step_size=prefill_step_size)
    limits = [max_tokens] * len(prompts) if isinstance(max_tokens, int) else list(max_tokens)
    if len(limits) != len(prompts):
        raise ValueError(f"max_tokens has {len(limits)} entries for {len(prompts)} prompts")
    ids = [
        engine.submit(p, max_tokens=m, sampler=sampler, logits_processors=logits_processors, stop=stop)
        for p, m in zip(prompts, limits)
    ]
    texts = {i: [] for i in ids}
    while engine.has_work():
        for event in engine.step():
            texts[event.request_id].append(event.text)
    return ["".join(texts[i]) for i in ids]
