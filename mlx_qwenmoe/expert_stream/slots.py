"""One MoE layer's routed experts held in a fixed pool of S slots, filled from disk on demand.

The pool is the layer's own ``SwitchGLU`` with its stacked (E, ...) arrays replaced,
once, by (S, ...) arrays: after routing, expert ids are mapped to slot ids and the
unchanged expert code (mlx-lm's ``gather_qmm``, our Metal kernels) runs on the pool.
A missed expert's rows are read into a staging buffer and written into its slot
in place. When one call needs more distinct experts than there are slots (a long
prefill chunk, or a budget below top-k), the experts are taken in groups of S and
each (token, expert) output is computed by the same ops as in the resident model,
then summed as it does, so results stay bit-identical.
"""

from __future__ import annotations

from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models.switch_layers import SwitchGLU

from ..ops.moe import MAX_DECODE_TOKENS, route, routed_experts
from ..ops.moe.reference import check_shared_pair, combine
from .slotmap import SlotMap
from .reader import CheckpointFiles, TensorRows


@dataclass
class StreamStats:
    """Counters over all layers since the last ``reset``."""

    tokens: int = 0
    lookups: int = 0  # distinct experts a layer call needed, summed
    hits: int = 0  # ... already resident (prefetched ones included)
    prefetch_hits: int = 0  # ... resident because the prefetch brought them
    predicted: int = 0  # experts the prefetch predicted for calls that then ran
    predicted_used: int = 0  # ... that the call did need
    needed_after_prediction: int = 0  # experts needed by calls that had a prediction
    bytes_read: int = 0
    experts_read: int = 0

    def reset(self) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, 0)

    def summary(self) -> str:
        hit = self.hits / max(self.lookups, 1)
        per_token = self.bytes_read / max(self.tokens, 1)
        acc = (
            f"prefetch accuracy {self.predicted_used / self.needed_after_prediction:.1%}"
            if self.needed_after_prediction
            else "no prefetch (only for calls of <= 4 tokens that fit the slots)"
        )
        return (
            f"experts: hit rate {hit:.1%} ({self.prefetch_hits} of {self.hits} hits prefetched), "
            f"{per_token / 2**20:.2f} MiB read per token, prompt included ({self.experts_read} expert reads), {acc}"
        )


@dataclass
class _Pending:
    experts: np.ndarray
    slots: np.ndarray
    buffers: List[np.ndarray]
    futures: List[Future] = field(default_factory=list)


class ExpertSlots:
    """The ``routed_experts`` substitute for one ``SparseMoeBlock`` (see ``model.SparseMoeBlock.streamed``)."""

    def __init__(
        self,
        prefix: str,
        experts: SwitchGLU,
        num_slots: int,
        files: CheckpointFiles,
        executor: Executor,
        stats: StreamStats,
        top_k: int,
        policy: str = "lfu",
    ):
        params = tree_flatten(experts.parameters())
        self.num_experts = params[0][1].shape[0]
        self.num_slots = num_slots
        self.files, self.executor, self.stats, self.top_k = files, executor, stats, top_k
        self._owners: List[Tuple[nn.Module, str]] = []
        self._rows: List[TensorRows] = []
        self._dtypes: List[mx.Dtype] = []
        modules = dict(experts.named_modules())
        for name, value in params:
            owner, leaf = name.rsplit(".", 1)
            self._owners.append((modules[owner], leaf))
            self._rows.append(files.rows(f"{prefix}.switch_mlp.{name}", self.num_experts, value.shape[1:]))
            self._dtypes.append(value.dtype)
            modules[owner][leaf] = mx.zeros((num_slots, *value.shape[1:]), dtype=value.dtype)
        self.expert_bytes = sum(r.row_bytes for r in self._rows)
        self.map = SlotMap(self.num_experts, num_slots, policy)
        self.next: Optional[Tuple[nn.Module, "ExpertSlots"]] = None  # (router, slots) of the next MoE layer
        self.counts_tokens = False
        self._pending: Optional[_Pending] = None
        self._predicted: Optional[np.ndarray] = None

    def __call__(
        self,
        x: mx.array,
        inds: mx.array,
        weights: mx.array,
        experts: SwitchGLU,
        shared_expert: Optional[nn.Module] = None,
        shared_expert_gate: Optional[nn.Module] = None,
    ) -> mx.array:
        ids = np.array(inds.astype(mx.int64))
        needed = np.unique(ids)
        if self.counts_tokens:
            self.stats.tokens += ids.size // ids.shape[-1]
        self._account(needed)
        self._install_pending()
        if needed.size > self.num_slots:
            check_shared_pair(shared_expert, shared_expert_gate)
            y = self._grouped(x, ids, needed, experts)
            return combine(x, y, weights, shared_expert, shared_expert_gate)
        self._ensure(needed)
        slot_inds = mx.array(self.map.slot_of[ids].astype(np.uint32))
        self._prefetch_next(x)
        return routed_experts(x, slot_inds, weights, experts, shared_expert, shared_expert_gate)

    def _account(self, needed: np.ndarray) -> None:
        s = self.stats
        resident = self.map.slot_of[needed] >= 0
        s.lookups += needed.size
        s.hits += int(resident.sum())
        if self._predicted is not None:
            used = np.isin(needed, self._predicted)
            s.predicted += self._predicted.size
            s.predicted_used += int(used.sum())
            s.needed_after_prediction += needed.size
            if self._pending is not None:
                s.prefetch_hits += int(np.isin(needed, self._pending.experts).sum())
            self._predicted = None

    def _grouped(self, x: mx.array, ids: np.ndarray, needed: np.ndarray, experts: SwitchGLU) -> mx.array:
        """Every (token, expert) output, (..., k, D), taking the needed experts S at a time."""
        missing = self.map.missing(needed)
        order = np.concatenate([needed[~np.isin(needed, missing)], missing])
        flat_ids = ids.reshape(-1, ids.shape[-1])
        xf = x.reshape(-1, x.shape[-1])
        y = None
        for start in range(0, order.size, self.num_slots):
            group = order[start : start + self.num_slots]
            self._ensure(group)
            mask = np.isin(flat_ids, group)
            rows = np.nonzero(mask.any(axis=1))[0]
            slot_of = self.map.slot_of
            slot_ids = np.where(mask, slot_of[flat_ids], slot_of[group[0]])[rows]
            part = experts(xf[mx.array(rows)], mx.array(slot_ids.astype(np.uint32)))
            if y is None:
                y = mx.zeros((xf.shape[0], *part.shape[1:]), dtype=part.dtype)
            rows_mx = mx.array(rows)
            y[rows_mx] = mx.where(mx.array(mask[rows])[..., None], part, y[rows_mx])
            # before the next group overwrites slots this one reads
            mx.eval(y)
        return y.reshape(*ids.shape, -1)

    def _ensure(self, needed: np.ndarray) -> None:
        """Make every expert in ``needed`` resident, reading the missing ones (in parallel)."""
        missing = self.map.missing(needed)
        if missing.size:
            self._install(self._submit(missing, self.map.claim(missing, keep=needed)))
        self.map.use(needed)

    def _submit(self, experts: np.ndarray, slots: np.ndarray) -> _Pending:
        pending = _Pending(experts, slots, [self.files.buffer(self.expert_bytes) for _ in experts])
        for e, buf in zip(experts, pending.buffers):
            ranges = [(r.file, r.offset + int(e) * r.row_bytes, r.row_bytes) for r in self._rows]
            pending.futures.append(self.executor.submit(self.files.read, ranges, buf))
        self.stats.bytes_read += self.expert_bytes * experts.size
        self.stats.experts_read += experts.size
        return pending

    def _install(self, pending: _Pending) -> None:
        """Wait for the reads, then write the rows into their slots (one scatter per tensor)."""
        try:
            # wait for every read, failed or not, before a staging buffer can be reused
            errors = [e for e in [f.exception() for f in pending.futures] if e is not None]
            if errors:
                raise errors[0]
            raw = np.stack(pending.buffers)
            idx = mx.array(pending.slots.astype(np.uint32))
            pos = 0
            for (owner, leaf), rows, dtype in zip(self._owners, self._rows, self._dtypes):
                values = rows.as_mlx(raw[:, pos : pos + rows.row_bytes])
                owner[leaf][idx] = values.astype(dtype)
                pos += rows.row_bytes
            mx.eval([owner[leaf] for owner, leaf in self._owners])
        except BaseException:
            self.map.drop(pending.experts)
            raise
        finally:
            for buf in pending.buffers:
                self.files.release(buf)

    def _install_pending(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self._install(pending)

    def _prefetch_next(self, x: mx.array) -> None:
        """Start reading the next MoE layer's likely experts: its router applied to this layer's input."""
        if self.next is None or x.size // x.shape[-1] > MAX_DECODE_TOKENS:
            return
        router, nxt = self.next
        _, inds = route(router(x), nxt.top_k, False)
        predicted = np.unique(np.array(inds))
        nxt._install_pending()
        nxt._predicted = predicted
        missing = nxt.map.missing(predicted)[: nxt.num_slots]
        if missing.size:
            nxt._pending = nxt._submit(missing, nxt.map.claim(missing, keep=missing[:0]))
