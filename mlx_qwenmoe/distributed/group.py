"""The process group, the start-up agreement between ranks, and how a lost rank is reported.

At start-up every rank loads its shard, then all ranks exchange, in one ``all_sum`` of a
small table, whether their load succeeded (with the error's first line if not) and a hash
of their checkpoint (config.json and every tensor's name, dtype and shape). A failed load
or a differing hash stops every rank with the same one-line error naming the rank.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Optional

import mlx.core as mx
import numpy as np

from ..errors import QwenMoeError

DIGEST_BYTES = 32
MESSAGE_BYTES = 240
_OK, _FAILED = 1, 2
_report_fd = 2  # where report_failures writes; quiet_unless_rank0 keeps it open


class DistributedError(QwenMoeError, RuntimeError):
    """A rank failed, died, or disagrees with the others."""


def world() -> Optional[mx.distributed.Group]:
    """The group this process was launched into (``mlx.launch``), or None when it runs alone."""
    if not mx.distributed.is_available():
        return None
    group = mx.distributed.init()
    return group if group.size() > 1 else None


def checkpoint_digest(model_dir: Path) -> bytes:
    """sha256 of config.json (parsed, key order ignored) and every tensor's name, dtype and shape."""
    from ..config import read_config
    from ..loading import check_safetensors, weight_files

    h = hashlib.sha256(json.dumps(read_config(Path(model_dir)), sort_keys=True).encode())
    index = {}
    for path in weight_files(Path(model_dir)):
        for name, info in check_safetensors(path).items():
            index[name] = (info["dtype"], info["shape"])
    h.update(json.dumps(sorted(index.items())).encode())
    return h.digest()


def agree(group: mx.distributed.Group, digest: Optional[bytes], error: Optional[str]) -> None:
    """Raise ``DistributedError`` on every rank if any rank's load failed or its checkpoint
    hash differs from rank 0's; return quietly when all agree."""
    n, rank = group.size(), group.rank()
    row = np.zeros(1 + DIGEST_BYTES + MESSAGE_BYTES, dtype=np.int32)
    row[0] = _OK if error is None else _FAILED
    if digest is not None:
        row[1 : 1 + DIGEST_BYTES] = np.frombuffer(digest, dtype=np.uint8)
    if error is not None:
        text = error.splitlines()[0].encode()[:MESSAGE_BYTES] if error else b"?"
        row[1 + DIGEST_BYTES : 1 + DIGEST_BYTES + len(text)] = np.frombuffer(text, dtype=np.uint8)
    table = np.zeros((n, row.size), dtype=np.int32)
    table[rank] = row
    table = np.array(mx.distributed.all_sum(mx.array(table), group=group))
    for r in range(n):
        if table[r, 0] != _OK:
            message = bytes(table[r, 1 + DIGEST_BYTES :].astype(np.uint8)).rstrip(b"\0").decode(errors="replace")
            raise DistributedError(f"rank {r} failed to load: {message}")
    digests = table[:, 1 : 1 + DIGEST_BYTES]
    for r in range(1, n):
        if not np.array_equal(digests[r], digests[0]):
            raise DistributedError(
                f"rank {r}'s checkpoint differs from rank 0's (config.json or tensor index hash "
                f"{bytes(digests[r].astype(np.uint8)).hex()[:12]} != {bytes(digests[0].astype(np.uint8)).hex()[:12]})"
            )


def report_failures(rank: int) -> None:
    """Make this rank's end, whatever ends it, one line on stderr naming the rank and cause.

    ``mlx.launch`` sends SIGTERM to the other ranks once one exits; without it, a collective
    whose peer went away raises ``RuntimeError`` ("connection to a peer was lost") within
    seconds. Any other uncaught error is this rank's own failure.
    """

    def on_sigterm(signum: int, _frame) -> None:
        _stopped(rank)

    def watch(fd: int) -> None:
        # Python runs signal handlers only between bytecodes of the main thread, which may be
        # blocked in a collective; the wakeup fd is written at once, so stop from here.
        while True:
            if signal.SIGTERM in os.read(fd, 16):
                _stopped(rank)

    def on_error(kind, error, tb) -> None:
        if issubclass(kind, KeyboardInterrupt):
            return previous(kind, error, tb)
        first = str(error).splitlines()[0] if str(error) else kind.__name__
        if issubclass(kind, RuntimeError) and "peer" in first:
            _report(f"rank {rank}: lost contact with another rank ({first}); stopping")
        elif issubclass(kind, DistributedError):
            _report(f"rank {rank}: {first}")
        else:
            _report(f"rank {rank}: failed: {kind.__name__}: {first}")
        os._exit(1)

    previous = sys.excepthook
    signal.signal(signal.SIGTERM, on_sigterm)
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    signal.set_wakeup_fd(write_fd)
    threading.Thread(target=watch, args=(read_fd,), daemon=True).start()
    sys.excepthook = on_error


def _stopped(rank: int) -> None:
    _report(f"rank {rank}: stopped: another rank exited (the launcher's warning names it)")
    os._exit(128 + signal.SIGTERM)


def _report(line: str) -> None:
    sys.stdout.flush()
    os.write(_report_fd, (line + "\n").encode())


def shared_seed(group: mx.distributed.Group) -> int:
    """Rank 0's random seed, so that sampling draws the same tokens on every rank."""
    mine = int.from_bytes(os.urandom(3), "little") if group.rank() == 0 else 0
    return int(mx.distributed.all_sum(mx.array([mine], dtype=mx.int32), group=group).item())


def quiet_unless_rank0(rank: int) -> None:
    """Ranks other than 0 print nothing (stdout, stderr) unless MLX_QWENMOE_ALL_RANKS_PRINT is set;
    their failure reports still reach the original stderr."""
    global _report_fd
    if rank != 0 and not os.environ.get("MLX_QWENMOE_ALL_RANKS_PRINT"):
        sys.stdout.flush()
        sys.stderr.flush()
        _report_fd = os.dup(2)  # failure reports still get out
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        os.close(devnull)
