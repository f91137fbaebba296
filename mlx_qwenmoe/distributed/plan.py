"""Planning a distributed run: what each rank holds, its memory headroom, and the traffic.

Bit widths come from the converter's planner (``convert.plan.plan_conversion``): every
tensor's bytes as a conversion at ``bits``/``group_size`` writes them. Each rank holds the
globals (embedding, head, final norm), the dense part of its stage's layers, its share of
their experts, and the MTP layer with its share of the MTP experts; its cache covers its
stage's layers and the MTP layer. Layers are split over the stages in proportion to the
smallest working-set limit of each stage's hosts.

Bytes per generated token are what one rank sends, without MTP: the ring ``all_sum`` of a
B-byte array sends 2 (N-1)/N B from each rank. Every split sums the hidden state, B = D x 2
bytes (bfloat16 activations): expert parallel once per MoE layer, pipeline once per stage
boundary (the last one gives every rank the final state), both for expert+pipeline.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ..config import ModelArgs, read_config
from ..convert.memory import GiB, layer_cache_bytes, parse_size, working_set_limit
from ..convert.pipeline import _dry_run_source as dry_run_source
from ..convert.plan import DEFAULT_RESERVE, DTYPES, plan_conversion
from ..errors import ConfigError
from .layout import Layout, split_layers, stage_count

_HOST = re.compile(r"\s*([^:@,]+):([^@,]+?)(?:@([^,]+))?\s*")


@dataclass(frozen=True)
class Host:
    name: str
    ram: int
    limit: int  # GPU working-set limit: macOS's default for ``ram``, or as raised (iogpu.wired_limit_mb)


def parse_hosts(text: str) -> List[Host]:
    """'mac1:64GB,mac2:24GB' (optionally 'mac1:128GB@120GB': the working-set limit raised to 120 GB)."""
    hosts = []
    for item in text.split(","):
        m = _HOST.fullmatch(item)
        if not m:
            raise ConfigError(f"hosts {text!r}: expected NAME:RAM[@LIMIT] entries such as mac1:64GB,mac2:24GB")
        ram = parse_size(m.group(2), "hosts")
        limit = parse_size(m.group(3), "hosts") if m.group(3) else working_set_limit(ram)
        hosts.append(Host(m.group(1), ram, limit))
    return hosts


@dataclass(frozen=True)
class RankPlan:
    host: Host
    layers: range
    experts: tuple  # (lo, hi) of the stage's layers
    weight_bytes: int
    cache_bytes: int
    reserve_bytes: int

    @property
    def headroom_bytes(self) -> int:
        return self.host.limit - self.weight_bytes - self.cache_bytes - self.reserve_bytes


@dataclass(frozen=True)
class DistributedPlan:
    mode: str
    model_type: str
    num_experts: int
    context: int
    recipe: str
    ranks: List[RankPlan]
    sums_per_token: int
    hidden_bytes: int

    @property
    def bytes_per_token(self) -> int:
        """Bytes one rank sends per generated token (ring all_sum)."""
        n = len(self.ranks)
        return self.sums_per_token * 2 * (n - 1) * self.hidden_bytes // n

    def problem(self) -> Optional[str]:
        """Why the plan does not fit, as one line; None when every rank fits."""
        for r, rank in enumerate(self.ranks):
            if rank.headroom_bytes < 0:
                return (f"rank {r} ({rank.host.name}) needs {(rank.weight_bytes + rank.cache_bytes + rank.reserve_bytes) / GiB:.2f} GiB "
                        f"(weights {rank.weight_bytes / GiB:.2f}, cache {rank.cache_bytes / GiB:.2f}, reserve "
                        f"{rank.reserve_bytes / GiB:.2f}) but its working-set limit is {rank.host.limit / GiB:.2f} GiB")
        return None

    def summary(self) -> str:
        lines = [f"Plan: {self.model_type} over {len(self.ranks)} ranks, parallel={self.mode}, {self.recipe}, "
                 f"context {self.context}",
                 f"{'rank':<5}{'host':<12}{'layers':<10}{'experts':<12}{'weights GiB':>12}{'cache GiB':>11}"
                 f"{'limit GiB':>11}{'headroom GiB':>14}"]
        for r, p in enumerate(self.ranks):
            layers = f"{p.layers.start}-{p.layers.stop - 1}"
            experts = f"{p.experts[0]}-{p.experts[1] - 1}/{self.num_experts}"
            lines.append(f"{r:<5}{p.host.name:<12}{layers:<10}{experts:<12}{p.weight_bytes / GiB:>12.2f}"
                         f"{p.cache_bytes / GiB:>11.2f}{p.host.limit / GiB:>11.2f}{p.headroom_bytes / GiB:>14.2f}")
        lines.append(f"per generated token: {self.sums_per_token} all_sums of {self.hidden_bytes} bytes, "
                     f"{self.bytes_per_token:,} bytes sent by each rank")
        return "\n".join(lines)


def model_config(src: str) -> Tuple[Dict[str, Any], str]:
    """(config, where it came from) of a model directory, a config.json, or a Hub repo id
    (only config.json is fetched), as the converter's dry run reads them."""
    path = Path(src).expanduser()
    if path.is_dir():
        return read_config(path), str(path / "config.json")
    config, _, where = dry_run_source(src)
    return config, where


def _stage_ranges(mode: str, hosts: Sequence[Host], layer_bytes: List[int]) -> List[tuple]:
    stages = stage_count(mode, len(hosts))
    per = len(hosts) // stages
    capacity = [min(h.limit for h in hosts[s * per:(s + 1) * per]) for s in range(stages)]
    return split_layers(layer_bytes, capacity)


def plan_distributed(config: Dict[str, Any], hosts: Sequence[Host], *, mode: str = "expert",
                     context: int = 32768, bits: int = 4, group_size: int = 64,
                     source: str = "config.json") -> DistributedPlan:
    """Per-rank weights, cache and headroom, and the traffic per token, of running ``config``
    over ``hosts`` with ``mode``."""
    if len(hosts) < 2:
        raise ConfigError("hosts: give at least two hosts")
    conv = plan_conversion(config, bits=bits, group_size=group_size, context=context, source=source)
    args = ModelArgs.from_config(config, source=source)
    unit_bytes: Dict[str, Dict[str, int]] = {}
    for t in conv.tensors:
        unit_bytes.setdefault(t.unit, {"experts": 0, "dense": 0})["experts" if t.kind == "experts" else "dense"] += t.nbytes
    layer_bytes = [sum(unit_bytes[f"layers.{i}"].values()) for i in range(args.num_hidden_layers)]
    stages = _stage_ranges(mode, hosts, layer_bytes)
    layout0 = Layout(mode, 0, len(hosts), tuple(stages))
    act = DTYPES[conv.dtype]
    ranks = []
    for r, host in enumerate(hosts):
        layout = Layout(mode, r, len(hosts), tuple(stages))
        lo, hi = layout.experts(args.num_experts)
        mlo, mhi = layout.mtp_experts(args.num_experts)
        weights = sum(unit_bytes["globals"].values())
        for i in layout.layers:
            u = unit_bytes[f"layers.{i}"]
            weights += u["dense"] + u["experts"] * (hi - lo) // args.num_experts
        for j in range(conv.mtp_layers):
            u = unit_bytes[f"mtp.layers.{j}"]
            weights += u["dense"] + u["experts"] * (mhi - mlo) // args.num_experts
        cache = sum(layer_cache_bytes(args, not args.is_linear(i), context, act) for i in layout.layers)
        cache += conv.mtp_layers * layer_cache_bytes(args, True, context, act)
        ranks.append(RankPlan(host, layout.layers, (lo, hi), weights, cache, DEFAULT_RESERVE))
    moe_sums = sum(args.is_sparse(i) for i in range(args.num_hidden_layers)) if layout0.per_stage > 1 else 0
    boundary_sums = len(stages) if len(stages) > 1 else 0
    return DistributedPlan(mode, args.model_type, args.num_experts, context, conv.recipe, ranks,
                           moe_sums + boundary_sums, args.hidden_size * act)
