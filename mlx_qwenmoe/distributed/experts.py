"""Expert parallelism: a MoE block that holds only this rank's experts, and routing counts.

``ExpertParallelMoe`` takes the place of a ``SparseMoeBlock`` with the same parameter names,
so the checkpoint loads into it unchanged except that ``switch_mlp`` stacks ``hi - lo``
experts. The router and the shared expert are replicated; every rank routes every token,
computes its own experts' share, and one ``all_sum`` over the group adds the shares. Only
the stage leader adds the shared expert, so it is counted once.

Work skipped: in prefill, only the (token, slot) pairs routed to this rank's experts are
gathered and computed (one host sync per layer for their count). At decode the Metal kernels
take a fixed (token, k) index array, so a slot routed elsewhere points at local expert 0 with
weight 0: each such slot still reads that expert's rows (about (1 - 1/G) * k expert matvecs
per token, of one expert that stays in cache), and contributes exactly zero.
"""

from __future__ import annotations

from typing import Dict, List

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.switch_layers import SwitchGLU

from ..ops.moe import MAX_DECODE_TOKENS, route, routed_experts
from ..ops.moe.reference import gated_shared_expert

PENDING_LIMIT = 256


class RoutingStats:
    """How often each expert of each MoE layer was selected, to plan a later rebalancing.

    The routed indices are kept as they are computed and folded into numpy counts in
    batches, so recording adds no work to the decode graph.
    """

    def __init__(self) -> None:
        self._counts: Dict[str, np.ndarray] = {}
        self._pending: List[tuple] = []

    def record(self, layer: str, num_experts: int, inds: mx.array) -> None:
        self._pending.append((layer, num_experts, inds))
        if len(self._pending) >= PENDING_LIMIT:
            self._fold()

    def _fold(self) -> None:
        pending, self._pending = self._pending, []
        mx.eval([inds for *_, inds in pending])
        for layer, num_experts, inds in pending:
            counts = self._counts.setdefault(layer, np.zeros(num_experts, dtype=np.int64))
            counts += np.bincount(np.array(inds).reshape(-1), minlength=num_experts)

    def counts(self) -> Dict[str, np.ndarray]:
        """Per MoE layer (its module path), selections per expert so far."""
        self._fold()
        return {k: v.copy() for k, v in self._counts.items()}


class ExpertParallelMoe(nn.Module):
    """A sparse MoE block holding experts ``[lo, hi)``; its output is summed over the group."""

    def __init__(self, block: nn.Module, lo: int, hi: int, with_shared: bool, path: str,
                 stats: RoutingStats, group: mx.distributed.Group):
        super().__init__()
        num_experts, hidden, dims = block.switch_mlp.gate_proj.weight.shape
        self.top_k, self.norm_topk_prob = block.top_k, block.norm_topk_prob
        self.gate = block.gate
        self.switch_mlp = SwitchGLU(dims, hidden, hi - lo)
        self.shared_expert = block.shared_expert
        self.shared_expert_gate = block.shared_expert_gate
        self._lo, self._hi, self._num_experts = lo, hi, num_experts
        self._with_shared, self._path, self._stats, self._group = with_shared, path, stats, group

    def __call__(self, x: mx.array) -> mx.array:
        weights, inds = route(self.gate(x), self.top_k, self.norm_topk_prob)
        self._stats.record(self._path, self._num_experts, inds)
        local = inds.astype(mx.int32) - self._lo
        mine = (local >= 0) & (local < self._hi - self._lo)
        local = mx.where(mine, local, 0).astype(mx.uint32)
        weights = mx.where(mine, weights, 0.0)
        shared = (self.shared_expert, self.shared_expert_gate) if self._with_shared else (None, None)
        if x.size // x.shape[-1] <= MAX_DECODE_TOKENS:
            y = routed_experts(x, local, weights, self.switch_mlp, *shared)
        else:
            y = self._local_pairs(x, local, weights, mine)
            if self._with_shared:
                y = y + gated_shared_expert(x, *shared)
        return mx.distributed.all_sum(y, group=self._group)

    def _local_pairs(self, x: mx.array, local: mx.array, weights: mx.array, mine: mx.array) -> mx.array:
        """sum over the slots routed here of weight * expert(x), computing only those pairs."""
        xf = x.reshape(-1, x.shape[-1])
        k = local.shape[-1]
        flat = mine.reshape(-1)
        count = int(flat.astype(mx.int32).sum().item())
        y = mx.zeros(xf.shape, dtype=x.dtype)
        if count:
            pairs = mx.argsort(mx.logical_not(flat).astype(mx.int32))[:count]
            tokens = pairs // k
            out = self.switch_mlp(xf[tokens], local.reshape(-1)[pairs][:, None])[:, 0]
            y = y.at[tokens].add(out * weights.reshape(-1)[pairs][:, None].astype(out.dtype))
        return y.reshape(x.shape)
