"""Speculative decoding with the checkpoint's own multi-token-prediction (MTP) head.

Each round drafts k tokens with the MTP head, runs the main model once over
[last token, k drafts], keeps the longest prefix it agrees with plus one token of
its own, and cuts every cache back to what plain decoding would hold.

MTP convention (Qwen3.5, as vLLM/SGLang and ``tools/train_demo_model.py``): slot t
reads the main model's final normed hidden h_t and the embedding of token x_{t+1} at
RoPE position t; its normed output's logits predict x_{t+2}. The MTP layer's own KV
cache holds slots 0..t-1 when slot t runs. For the j-th draft (j > 1) h is not known
yet, so the MTP's own normed output of the previous slot stands in for it (what vLLM
and SGLang feed back; it is also what ``pre_fc_norm_hidden`` saw in training, a
normed hidden). Once the main model has verified a round, the accepted slots are
recomputed from the true hidden states, so the MTP cache never keeps a stand-in.

Verification keeps the output distribution exactly the main model's:
- greedy (``sampler`` None, or a ``SamplerSpec`` with temp 0): accept while draft == argmax;
- a ``SamplerSpec``: the standard speculative rejection rule (Leviathan et al. 2023;
  Chen et al. 2023), drafts drawn from the MTP's processed distribution;
- any other sampler: sample-and-match. The sampler draws every position's token as plain
  decoding would and the MTP's argmax drafts are accepted while they equal the draws:
  exact for any sampler, with lower acceptance than the rejection rule.

Rollback: attention caches move their offset back. DeltaNet caches record, during the
verify pass, the conv input and the recurrent state after each token of the block
(``DeltaNetCache.record_steps``), so dropping rejected tokens is an index, not a
recomputation (benchmarks/README.md has the measurements behind this choice).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, List, Optional, Sequence, Tuple

import mlx.core as mx

from .cache import DeltaNetCache
from .errors import CheckpointError
from .generate import CheckpointHook, chunk_spans
from .sampling import LogitsProcessor, Sampler, SamplerSpec, log_probs

__all__ = ["MtpState", "SpecStats", "mtp_generate_step"]


@dataclass
class SpecStats:
    """Counts of one speculative generation. A round is one main-model forward after prefill."""

    draft_tokens: int = 0
    rounds: int = 0
    tokens: int = 0  # tokens the rounds produced (the first token comes from prefill)
    drafted: List[int] = field(default_factory=list)  # per draft position: rounds that drafted it
    accepted: List[int] = field(default_factory=list)  # per draft position: rounds that accepted it

    def record(self, n_drafted: int, n_accepted: int, n_tokens: int) -> None:
        grow = n_drafted - len(self.drafted)
        if grow > 0:
            self.drafted += [0] * grow
            self.accepted += [0] * grow
        for j in range(n_drafted):
            self.drafted[j] += 1
            self.accepted[j] += j < n_accepted
        self.rounds += 1
        self.tokens += n_tokens

    @property
    def acceptance_rate(self) -> float:
        return sum(self.accepted) / max(sum(self.drafted), 1)

    @property
    def acceptance_by_position(self) -> List[float]:
        """Share of rounds whose drafts 1..j were all accepted (vLLM's per-position rate)."""
        return [a / max(d, 1) for a, d in zip(self.accepted, self.drafted)]

    @property
    def tokens_per_forward(self) -> float:
        return self.tokens / max(self.rounds, 1)

    def __str__(self) -> str:
        positions = ", ".join(f"{r:.0%}" for r in self.acceptance_by_position)
        return (
            f"MTP speculative decoding: {self.draft_tokens} draft tokens, acceptance {self.acceptance_rate:.1%} "
            f"(by position: {positions}), {self.tokens_per_forward:.2f} tokens per main-model forward "
            f"({self.tokens} tokens in {self.rounds} forwards after prefill)"
        )


@dataclass
class MtpState:
    """The caches an MTP generation runs on. ``mtp_cache`` holds the MTP slots before position
    ``start``; ``hidden`` (1, n, H) holds the main model's hidden states from ``start`` on, whose
    slots wait for the next token. A prompt cache hands one in and reads it back afterwards."""

    cache: List[Any]
    mtp_cache: List[Any]
    start: int = 0
    hidden: Optional[mx.array] = None

    @property
    def depth(self) -> int:
        """Tokens the main cache holds when the generation starts."""
        return self.start + (0 if self.hidden is None else self.hidden.shape[1])

    def settle(self, model: Any, tokens: Sequence[int]) -> mx.array:
        """Cut the caches back to ``tokens`` (what the main cache should hold: the prompt and
        every yielded token but the last), run the MTP slots still pending but the last, and
        return the hidden state of the last token (1, 1, H), whose slot waits for the next one."""
        n = len(tokens)
        extra = next(c for c in self.cache if not isinstance(c, DeltaNetCache)).offset - n  # unverified drafts
        for c in self.cache:
            c.trim(extra)
        for c in self.mtp_cache:
            c.trim(c.offset - self.start)
        k = n - 1 - self.start
        if k > 0:
            model.mtp(self.hidden[:, :k], model.embed(mx.array(tokens[self.start + 1 : n], mx.uint32))[None], self.mtp_cache)
        return self.hidden[:, k : k + 1]


def _extend(history: Optional[mx.array], tokens: List[mx.array]) -> Optional[mx.array]:
    """The token history a logits processor sees after ``tokens`` (None when no processors run)."""
    if history is None or not tokens:
        return history
    return mx.concatenate([history, *tokens])


def _rejection_rule(
    spec: SamplerSpec, logprobs: mx.array, draft_ids: mx.array, draft_probs: List[mx.array]
) -> Tuple[mx.array, mx.array]:
    """Speculative sampling (Leviathan et al. 2023; Chen et al. 2023): draft j, drawn from p_j, is
    accepted with probability min(1, q_j(d_j) / p_j(d_j)); the first rejected position samples the
    residual max(q_j - p_j, 0) instead, and if all are accepted the bonus position samples q_k.

    logprobs: (k+1, V) of the main model. Returns (accept (k,), replacement token per position (k+1,)).
    """
    k = draft_ids.size
    q = spec.probs(logprobs)
    p = mx.concatenate(draft_probs, axis=0) if k else mx.zeros((0, q.shape[-1]))
    cols = draft_ids[:, None].astype(mx.int32)
    q_d = mx.take_along_axis(q[:k], cols, axis=-1)[:, 0]
    p_d = mx.take_along_axis(p, cols, axis=-1)[:, 0]
    accept = mx.random.uniform(shape=(k,)) * p_d < q_d
    residual = mx.concatenate([mx.maximum(q[:k] - p, 0.0), q[k:]], axis=0)
    return accept, mx.random.categorical(mx.log(residual))


def _match_rule(draw: Sampler, logprobs: mx.array, draft_ids: mx.array) -> Tuple[mx.array, mx.array]:
    """Draw every position's token as plain decoding would; a draft is accepted iff it equals the
    draw, and the first mismatch keeps the draw. Exact for any sampler, stochastic or not."""
    targets = draw(logprobs)
    return targets[: draft_ids.size] == draft_ids, targets


def _first_rejection(accept: List[bool]) -> int:
    return next((j for j, ok in enumerate(accept) if not ok), len(accept))


class _Speculation:
    """One speculative generation in its named steps: prefill, draft, verify, accept, roll back.

    Between rounds ``y`` is the last token handed out; the MTP slots still to run pair
    ``pending_hidden`` (main-model hidden states) with ``pending_tokens`` (the tokens after
    them); ``pos`` counts the tokens in the main cache; ``state`` is kept current for a
    prompt cache to read back.
    """

    def __init__(self, model: Any, sampler: Optional[Sampler], processors: List[LogitsProcessor], state: MtpState):
        self.model, self.processors, self.state = model, processors, state
        greedy = sampler is None or (isinstance(sampler, SamplerSpec) and sampler.greedy)
        self.spec = sampler if isinstance(sampler, SamplerSpec) and not greedy else None
        self.draw = (lambda lp: mx.argmax(lp, axis=-1)) if greedy else sampler
        self.history: Optional[mx.array] = None

    def mtp(self, hidden: mx.array, next_tokens: mx.array) -> mx.array:
        return self.model.mtp(hidden, self.model.embed(next_tokens)[None], self.state.mtp_cache)

    def prefill(self, prompt: mx.array, step: int, checkpoints: Sequence[int],
                on_checkpoint: Optional[CheckpointHook], context: Optional[mx.array]) -> mx.array:
        """Run the prompt into the caches; returns the first token's log-probabilities. MTP slots
        pair each hidden with the next prompt token, so every chunk but the last runs its slots
        at once (with any slot the given state left pending); the last chunk's wait for the
        first sampled token."""
        state, cache, n = self.state, self.state.cache, prompt.size
        base = state.depth
        pending = [] if state.hidden is None else [state.hidden]
        for start, end in chunk_spans(n, step, checkpoints):
            hidden = self.model.hidden(prompt[None, start:end], cache)
            lag = sum(p.shape[1] for p in pending)
            pending.append(hidden)
            if end < n:
                self.mtp(mx.concatenate(pending, axis=1), prompt[start + 1 - lag : end + 1])
                pending = []
                mx.eval([c.state for c in cache + state.mtp_cache])
                if on_checkpoint is not None:
                    on_checkpoint(end, hidden[:, -1:])
                mx.clear_cache()
        self.history = (prompt if context is None else mx.concatenate([context, prompt])) if self.processors else None
        logprobs = log_probs(self.model.logits(hidden[:, -1]), self.history, self.processors)
        self.y = self.draw(logprobs).astype(mx.uint32).reshape(1)
        mx.eval(self.y, logprobs)
        self.pending_hidden = mx.concatenate(pending, axis=1)
        state.start, state.hidden = base + start - lag, self.pending_hidden
        self.pending_tokens = mx.concatenate([prompt[start + 1 - lag :], self.y])
        self.pos = base + n
        self.history = _extend(self.history, [self.y])
        for c in cache:
            if isinstance(c, DeltaNetCache):
                c.record_steps = True
        return logprobs

    def draft(self, n: int) -> Tuple[List[mx.array], List[mx.array]]:
        """``n`` draft tokens (and, for the rejection rule, the distributions they were drawn
        from). The first MTP call also catches up on the slots accepted last round."""
        drafts: List[mx.array] = []
        probs: List[mx.array] = []
        if n:
            g = self.mtp(self.pending_hidden, self.pending_tokens)[:, -1:]
        for j in range(n):
            lp = log_probs(self.model.logits(g[:, -1]), _extend(self.history, drafts), self.processors)
            if self.spec is not None:
                probs.append(self.spec.probs(lp))
                drafts.append(mx.random.categorical(mx.log(probs[-1])).astype(mx.uint32).reshape(1))
            else:
                drafts.append(mx.argmax(lp, axis=-1).reshape(1))
            if j + 1 < n:
                g = self.mtp(g, drafts[-1])
        return drafts, probs

    def verify(self, drafts: List[mx.array]) -> Tuple[mx.array, mx.array]:
        """One main-model forward over [y, drafts]: its hidden states and (k+1, V) log-probabilities."""
        hidden = self.model.hidden(mx.concatenate([self.y, *drafts])[None], self.state.cache)
        if drafts:  # the first MTP call of ``draft`` ran the pending slots
            self.state.start, self.state.hidden = self.pos, hidden
        else:
            self.state.hidden = mx.concatenate([self.state.hidden, hidden], axis=1)
        logits = self.model.logits(hidden[0])
        rows = [
            log_probs(logits[i : i + 1], _extend(self.history, drafts[:i]), self.processors)
            for i in range(len(drafts) + 1)
        ]
        return hidden, mx.concatenate(rows, axis=0)

    def accept(self, logprobs: mx.array, draft_ids: mx.array, probs: List[mx.array]) -> Tuple[int, mx.array]:
        """How many drafts stand, and the token that follows them."""
        if self.spec is not None:
            accept, replacement = _rejection_rule(self.spec, logprobs, draft_ids, probs)
        else:
            accept, replacement = _match_rule(self.draw, logprobs, draft_ids)
        mx.eval(accept, replacement, draft_ids, logprobs)
        a = _first_rejection(accept.tolist())
        return a, replacement[a : a + 1].astype(mx.uint32)

    def roll_back(self, n_draft: int, hidden: mx.array, accepted: mx.array, nxt: mx.array) -> None:
        """Cut the caches back to what plain decoding would hold and queue the accepted MTP slots."""
        a = accepted.size
        for c in self.state.cache:
            c.trim(n_draft - a)
        for c in self.state.mtp_cache:
            c.trim(max(n_draft - 1, 0))
        self.history = _extend(self.history, [accepted, nxt])
        self.pending_hidden = hidden[:, : a + 1]
        self.pending_tokens = mx.concatenate([accepted, nxt])
        self.state.hidden = self.state.hidden[:, : self.pos - self.state.start + a + 1]  # what the cache kept
        self.pos += a + 1
        self.y = nxt


def mtp_generate_step(
    prompt: mx.array,
    model: Any,
    *,
    max_tokens: int = 256,
    sampler: Optional[Sampler] = None,
    logits_processors: Optional[List[LogitsProcessor]] = None,
    prefill_step_size: int = 2048,
    draft_tokens: int = 2,
    stats: Optional[SpecStats] = None,
    state: Optional[MtpState] = None,
    checkpoints: Sequence[int] = (),
    on_checkpoint: Optional[CheckpointHook] = None,
    context: Optional[mx.array] = None,
) -> Iterator[Tuple[int, mx.array, bool]]:
    """Generate from ``prompt`` (1-D token ids) with MTP drafts; yields (token, logprobs, from_draft).

    logprobs is the main model's (V,) log-distribution after ``logits_processors`` at the
    position that produced the token, as mlx-lm's generate_step yields it. ``max_tokens``
    < 0 generates without end. ``stats``, if given, is filled in as generation goes.
    ``state`` continues from caches that already hold a prefix of the sequence (``prompt`` is
    then the rest) and is kept current; ``checkpoints``/``on_checkpoint``/``context`` as in
    ``generate_step``.
    """
    if not getattr(model, "has_mtp", False):
        raise CheckpointError("the model has no MTP head (no mtp.* tensors in its checkpoint)")
    if draft_tokens < 1:
        raise ValueError(f"draft_tokens must be at least 1, not {draft_tokens}")
    if prompt.size == 0:
        raise ValueError("the prompt is empty")
    stats = stats if stats is not None else SpecStats()
    stats.draft_tokens = draft_tokens
    state = state if state is not None else MtpState(model.make_cache(), model.make_mtp_cache())
    run = _Speculation(model, sampler, list(logits_processors or []), state)
    logprobs = run.prefill(prompt.astype(mx.uint32), prefill_step_size, checkpoints, on_checkpoint, context)
    yield run.y.item(), logprobs[0], False
    generated = 1
    while max_tokens < 0 or generated < max_tokens:
        n_draft = draft_tokens if max_tokens < 0 else min(draft_tokens, max_tokens - generated - 1)
        drafts, probs = run.draft(n_draft)
        hidden, logprobs = run.verify(drafts)
        draft_ids = mx.concatenate(drafts) if drafts else mx.zeros((0,), mx.uint32)
        a, nxt = run.accept(logprobs, draft_ids, probs)
        stats.record(n_draft, a, a + 1)
        for j, token in enumerate(draft_ids[:a].tolist()):
            yield token, logprobs[j], True
        yield nxt.item(), logprobs[a], False
        generated += a + 1
        run.roll_back(n_draft, hidden, draft_ids[:a], nxt)
