"""The generation thread with continuous batching: concurrent jobs decode together, one
batched forward pass per step, through ``batch.BatchEngine``.

Each job starts from the prompt cache's deepest checkpointed prefix of its prompt (``lookup``
builds fresh caches for it, so the engine's in-place updates never touch what the cache
stores); its prefill keeps the cache's checkpoints (message boundaries, intervals, the
prompt's end), and its finished sequence goes back into the cache with them (``store``). Only this thread
touches the prompt cache and the engine. A job whose client went away is cancelled in the
engine before the next step, and its caches are dropped with it.
"""

from __future__ import annotations

import logging
import queue
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from ..batch import BatchEngine, BatchEvent
from .backend import Backend, Usage, log_line
from .worker import JobHandle, Worker

log = logging.getLogger("mlx_qwenmoe.server")


@dataclass
class _Running:
    handle: JobHandle
    cached: int
    started: float = field(default_factory=time.perf_counter)
    first_token: Optional[float] = None
    tokens: List[int] = field(default_factory=list)
    checkpoints: Dict[int, Any] = field(default_factory=dict)  # prompt-cache snapshots taken in prefill
    cancelled: bool = False


class BatchWorker(Worker):
    """Up to ``max_batch`` jobs decode together; up to ``max_queue`` more wait."""

    def __init__(self, backend: Backend, *, max_batch: int = 8, max_queue: int = 32, prefill_step_size: int = 512):
        super().__init__(backend, capacity=max_batch + max_queue)
        self.engine = BatchEngine(backend.model, backend.tokenizer, max_batch=max_batch,
                                  prefill_step_size=prefill_step_size)
        self._running: Dict[int, _Running] = {}
        # One sampler object per setting: the engine samples all the rows sharing one in one call.
        self._samplers: Dict[tuple, Any] = {}

    def stop(self) -> None:
        for running in list(self._running.values()):
            running.handle.cancel()
        self._jobs.put(None)
        self._thread.join()

    def load(self) -> dict:
        return {
            **super().load(),
            "active_requests": self.engine.num_active,
            "queued_requests": self.engine.num_waiting + self._jobs.qsize(),
        }

    def _run(self) -> None:
        while True:
            if not self._admit(block=not self.engine.has_work()):
                return
            for request_id, running in self._running.items():
                if running.handle.cancelled and not running.cancelled:
                    running.cancelled = self.engine.cancel(request_id)
            if not self.engine.has_work():
                continue
            try:
                events = self.engine.step()
            except Exception as e:  # noqa: BLE001  the server must keep serving whatever one step raised
                self._fail_all(e)
                continue
            for event in events:
                self._deliver(event)
            if not self.engine.has_work():
                self._record_memory()

    def _admit(self, block: bool) -> bool:
        """Submit the newly queued jobs to the engine; False once the worker is stopped."""
        while True:
            try:
                handle = self._jobs.get(block=block)
            except queue.Empty:
                return True
            block = False
            if handle is None:
                return False
            if handle.cancelled:
                self._end(handle)
                continue
            try:
                self._submit(handle)
            except Exception as e:  # noqa: BLE001  a job the engine refuses fails alone
                log.exception("%s: generation failed", handle.job.request_id)
                handle._put(e)
                self._end(handle)

    def _submit(self, handle: JobHandle) -> None:
        job = handle.job
        sampler, processors = self.backend.sampling(job)
        sampler = self._samplers.setdefault((sampler.temp, sampler.top_p, sampler.min_p, sampler.top_k), sampler)
        running = _Running(handle, 0)
        prompt_cache, hooks = self.backend.prompt_cache, {}
        if prompt_cache is not None:
            hit = prompt_cache.lookup(job.prompt_ids)
            running.cached = hit.depth
            kinds = prompt_cache.prefill_checkpoints(hit, len(job.prompt_ids), job.boundaries)

            def on_checkpoint(n: int, cache: list) -> None:
                running.checkpoints[hit.depth + n] = prompt_cache.snapshot(cache, kinds[hit.depth + n])

            hooks = dict(cache=hit.cache, return_cache=True, checkpoints=[d - hit.depth for d in kinds],
                         on_checkpoint=on_checkpoint, context=job.prompt_ids[: hit.depth])
        request_id = self.engine.submit(
            job.prompt_ids[running.cached:], max_tokens=job.max_tokens, sampler=sampler, logits_processors=processors,
            stop=job.stop, **hooks,
        )
        self._running[request_id] = running

    def _deliver(self, event: BatchEvent) -> None:
        running = self._running[event.request_id]
        job = running.handle.job
        if event.token is not None:
            running.tokens.append(event.token)
            if running.first_token is None:
                running.first_token = time.perf_counter()
            usage = None
            if event.finish_reason:
                usage = Usage(len(job.prompt_ids), len(running.tokens), running.cached)
            running.handle._put(self.backend.step(job, event.token, event.text, event.logprobs,
                                                  event.finish_reason, usage))
        if event.finish_reason is None:
            return
        del self._running[event.request_id]
        if event.cache is not None:
            # The returned caches hold the prompt and every generated token but the last.
            self.backend.prompt_cache.store(job.prompt_ids + running.tokens[:-1], event.cache, running.checkpoints)
        log.info(self._log_line(running, event.finish_reason))
        self._end(running.handle)

    @staticmethod
    def _log_line(running: _Running, finish_reason: str) -> str:
        job = running.handle.job
        now = time.perf_counter()
        first = running.first_token or now
        prefill_tps = (len(job.prompt_ids) - running.cached) / max(first - running.started, 1e-9)
        decode_tps = (len(running.tokens) - 1) / (now - first) if len(running.tokens) > 1 else 0.0
        return log_line(job, running.cached, prefill_tps, decode_tps, len(running.tokens), finish_reason)

    def _fail_all(self, error: Exception) -> None:
        """A step raised: every running job gets the error, and a fresh engine takes over."""
        log.exception("batched generation step failed")
        for running in self._running.values():
            running.handle._put(error)
            self._end(running.handle)
        self._running.clear()
        self.engine = BatchEngine(self.engine.model, self.engine.tokenizer, max_batch=self.engine.max_batch,
                                  prefill_step_size=self.engine.prefill_step_size)
        self._record_memory()
