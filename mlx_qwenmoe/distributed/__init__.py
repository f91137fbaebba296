"""Running one model over several processes (Macs) with ``mx.distributed``, under ``mlx.launch``.

``load_parallel`` loads this rank's share (see ``layout`` for who holds what), then checks
with the other ranks that every load succeeded on the same checkpoint. The loaded model
keeps mlx-lm's protocol, so generation code runs unchanged on every rank; every rank gets
the same logits and so samples the same tokens.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import mlx.core as mx

from ..errors import QwenMoeError
from .experts import RoutingStats
from .group import DistributedError, agree, quiet_unless_rank0, report_failures, shared_seed, world
from .layout import MODES, Layout, stage_count
from .shard import Sharder

__all__ = ["MODES", "DistributedError", "Layout", "RoutingStats", "load_parallel", "world"]


def load_parallel(load: Callable[..., Tuple], parallel: Optional[str], group: mx.distributed.Group) -> Tuple:
    """Call ``load(shard=hook)`` (which returns (model, ...)) as this rank of ``group`` with
    ``parallel`` ("expert" when None); every rank raises ``DistributedError`` if any failed."""
    mode = parallel or "expert"
    rank = group.rank()
    report_failures(rank)
    quiet_unless_rank0(rank)
    stats = RoutingStats()
    sharder = Sharder(mode, group, stats)
    result, error = None, None
    try:
        stage_count(mode, group.size())
        result = load(sharder)
    except (QwenMoeError, OSError, ValueError, RuntimeError) as e:
        error = f"{type(e).__name__}: {e}"
    agree(group, sharder.digest, error)
    # every rank must draw the same tokens; an explicit mx.random.seed later still applies
    mx.random.seed(shared_seed(group))
    model = result[0]
    model.layout, model.routing_stats = sharder.layout, stats
    return result
