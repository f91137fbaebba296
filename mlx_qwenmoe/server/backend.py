"""The one place the server generates: a ``GenerationJob`` in, ``Step``s out, through
``stream_generate``. It runs on the worker thread only (MLX is not safe to drive from two
threads), so nothing here is shared with the HTTP side but plain data."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import mlx.core as mx
from mlx_lm.sample_utils import make_logits_processors

from ..generate import stream_generate
from ..sampling import SamplerSpec
from ..speculative import SpecStats

log = logging.getLogger("mlx_qwenmoe.server")


@dataclass
class SamplingParams:
    """OpenAI's sampling fields; top_p 1, top_k 0 and min_p 0 switch their filter off."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: Optional[float] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    seed: Optional[int] = None


def sampling_defaults(model_dir: Path) -> Dict[str, Any]:
    """The checkpoint's recommended temperature/top_p/top_k (generation_config.json), used
    where a request leaves them out."""
    path = Path(model_dir) / "generation_config.json"
    try:
        config = json.loads(path.read_text()) if path.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return {}
    keys = {"temperature": float, "top_p": float, "top_k": int, "min_p": float}
    return {k: cast(config[k]) for k, cast in keys.items() if isinstance(config.get(k), (int, float))}


@dataclass
class GenerationJob:
    """One request, tokenized and checked: everything the backend needs, as plain data."""

    request_id: str
    prompt_ids: List[int]
    max_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: List[str] = field(default_factory=list)
    top_logprobs: Optional[int] = None  # None: no logprobs; 0: the chosen token's only
    boundaries: List[int] = field(default_factory=list)  # where chat messages begin (prompt-cache checkpoints)


@dataclass
class TokenLogprob:
    token: str
    logprob: float
    top: List[Tuple[str, float]]


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


@dataclass
class Step:
    """One generated token; the last step has ``finish_reason`` and ``usage``."""

    text: str
    token: int
    logprob: Optional[TokenLogprob] = None
    finish_reason: Optional[str] = None
    usage: Optional[Usage] = None


class Backend:
    """Generates for one job at a time with ``stream_generate`` (MTP when ``mtp``), every job
    through ``prompt_cache`` (a ``PromptCache``; not thread-safe, so only the worker thread
    touches it)."""

    def __init__(self, model: Any, tokenizer: Any, *, mtp: bool = False, draft_tokens: int = 2,
                 prompt_cache: Optional[Any] = None):
        self.model = model
        self.tokenizer = tokenizer
        self.mtp = mtp
        self.draft_tokens = draft_tokens
        self.prompt_cache = prompt_cache

    def sampling(self, job: GenerationJob) -> Tuple[SamplerSpec, List[Any]]:
        """The job's sampler and logits processors (and its seed, set now)."""
        s = job.sampling
        sampler = SamplerSpec(s.temperature, top_p=s.top_p, min_p=s.min_p, top_k=max(s.top_k, 0))
        processors = make_logits_processors(
            repetition_penalty=s.repetition_penalty,
            presence_penalty=s.presence_penalty,
            frequency_penalty=s.frequency_penalty,
        )
        if s.seed is not None:
            mx.random.seed(s.seed)
        return sampler, processors

    def step(self, job: GenerationJob, token: int, text: str, logprobs: mx.array, finish_reason: Optional[str],
             usage: Optional[Usage]) -> Step:
        return Step(text=text, token=token, logprob=self._logprob(token, logprobs, job.top_logprobs),
                    finish_reason=finish_reason, usage=usage)

    def generate(self, job: GenerationJob) -> Iterator[Step]:
        sampler, processors = self.sampling(job)
        stats = SpecStats() if self.mtp else None
        responses = stream_generate(
            self.model,
            self.tokenizer,
            mx.array(job.prompt_ids, dtype=mx.uint32),
            job.max_tokens,
            sampler=sampler,
            logits_processors=processors,
            stop=job.stop,
            mtp=self.mtp,
            draft_tokens=self.draft_tokens,
            mtp_stats=stats,
            prompt_cache=self.prompt_cache,
            boundaries=job.boundaries,
        )
        last = None
        try:
            for last in responses:
                usage = None
                if last.finish_reason:
                    usage = Usage(last.prompt_tokens, last.generation_tokens, last.cached_tokens)
                yield self.step(job, last.token, last.text, last.logprobs, last.finish_reason, usage)
        finally:
            responses.close()
            if last is None:
                log.info(f"{job.request_id}: prompt {len(job.prompt_ids)} tokens, stopped before the first token")
            else:
                log.info(log_line(job, last.cached_tokens, last.prompt_tps, last.generation_tps,
                                  last.generation_tokens, last.finish_reason, stats))

    def _logprob(self, token: int, logprobs: mx.array, top: Optional[int]) -> Optional[TokenLogprob]:
        if top is None:
            return None
        decode = self.tokenizer.decode
        best: List[Tuple[str, float]] = []
        if top > 0:
            ids = mx.argpartition(-logprobs, kth=top - 1)[:top]
            values = logprobs[ids]
            order = mx.argsort(-values)
            best = [(decode([int(i)]), float(v)) for i, v in zip(ids[order].tolist(), values[order].tolist())]
        return TokenLogprob(decode([token]), float(logprobs[token].item()), best)



def log_line(job: GenerationJob, cached: int, prompt_tps: float, decode_tps: float, generated: int,
             finish_reason: Optional[str], stats: Optional[SpecStats] = None) -> str:
    """The per-request log line: prompt and cached tokens, prefill and decode speed, MTP acceptance."""
    end = f"finish {finish_reason}" if finish_reason and finish_reason != "cancelled" else "cancelled"
    line = (
        f"{job.request_id}: prompt {len(job.prompt_ids)} tokens, cached {cached}, "
        f"prefill {prompt_tps:.1f} tok/s, decode {decode_tps:.1f} tok/s, {generated} tokens, {end}"
    )
    if stats is not None:
        line += f", MTP acceptance {stats.acceptance_rate:.1%} ({stats.tokens_per_forward:.2f} tokens/forward)"
    return line
