"""One dedicated thread runs every generation; ``Worker`` runs one job at a time, in arrival
order (``batch_worker.BatchWorker`` decodes several together).

The HTTP side submits a job and reads its steps from an ``asyncio.Queue`` filled from the
worker thread; cancelling a job (its client went away) stops it after the current step,
and closing the generation frees its caches before the next job starts. At most
``capacity`` jobs are admitted at once (running and queued); beyond it ``submit`` raises
``QueueFull``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from typing import AsyncIterator, Optional, Union

import mlx.core as mx

from .backend import Backend, GenerationJob, Step

log = logging.getLogger("mlx_qwenmoe.server")

_END = object()


class QueueFull(Exception):
    """The worker holds as many jobs as it admits; the client should retry later."""


class JobHandle:
    """The HTTP side's view of a submitted job: its steps, and a way to cancel it."""

    def __init__(self, job: GenerationJob, loop: asyncio.AbstractEventLoop):
        self.job = job
        self._loop = loop
        self._steps: asyncio.Queue = asyncio.Queue()
        self._cancelled = threading.Event()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        self._cancelled.set()

    def _put(self, item: Union[Step, BaseException, object]) -> None:
        self._loop.call_soon_threadsafe(self._steps.put_nowait, item)

    async def steps(self) -> AsyncIterator[Step]:
        """The job's steps as they come; raises what the generation raised."""
        while True:
            item = await self._steps.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item


class Worker:
    """Owns the backend and the thread that drives it."""

    def __init__(self, backend: Backend, capacity: int = 1 << 30):
        self.backend = backend
        self.capacity = capacity
        self._admitted = 0
        self._lock = threading.Lock()
        self._jobs: "queue.Queue[Optional[JobHandle]]" = queue.Queue()
        self._active: Optional[JobHandle] = None
        self._memory_after_last_job = 0
        self._prompt_cache_after_last_job = 0
        self._thread = threading.Thread(target=self._run, name="mlx_qwenmoe-generation", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        active = self._active
        if active is not None:
            active.cancel()
        self._jobs.put(None)
        self._thread.join()

    def submit(self, job: GenerationJob) -> JobHandle:
        with self._lock:
            if self._admitted >= self.capacity:
                raise QueueFull(f"the server holds {self._admitted} requests, its most")
            self._admitted += 1
        handle = JobHandle(job, asyncio.get_running_loop())
        self._jobs.put(handle)
        return handle

    def _end(self, handle: JobHandle) -> None:
        """The job is over: its stream ends and its place is free."""
        with self._lock:
            self._admitted -= 1
        handle._put(_END)

    def _record_memory(self) -> None:
        """Give freed buffers back, then note the memory in use and the prompt cache's share."""
        mx.clear_cache()
        self._memory_after_last_job = mx.get_active_memory()
        cache = self.backend.prompt_cache
        self._prompt_cache_after_last_job = cache.nbytes if cache is not None else 0

    def load(self) -> dict:
        """How busy the worker is (the running job, 0 or 1, and those waiting), and the MLX
        memory in use once the last job had released its caches, of which the prompt cache holds
        ``prompt_cache_bytes``."""
        return {
            "active_requests": int(self._active is not None),
            "queued_requests": self._jobs.qsize(),
            "memory_after_last_request_bytes": self._memory_after_last_job,
            "prompt_cache_bytes": self._prompt_cache_after_last_job,
        }

    def _run(self) -> None:
        while True:
            handle = self._jobs.get()
            if handle is None:
                return
            self._active = handle
            try:
                self._serve(handle)
            finally:
                self._active = None

    def _serve(self, handle: JobHandle) -> None:
        try:
            if handle.cancelled:
                return
            with contextlib.closing(self.backend.generate(handle.job)) as steps:
                for step in steps:
                    handle._put(step)
                    if handle.cancelled:
                        break
        except Exception as e:  # noqa: BLE001  the server must keep serving whatever one job raised
            log.exception("%s: generation failed", handle.job.request_id)
            handle._put(e)
        finally:
            self._record_memory()  # the closed generation dropped its caches
            self._end(handle)
