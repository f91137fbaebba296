"""Talking to the Hugging Face Hub with a deadline: a Hub that accepts the connection and then
never answers must fail in stated seconds, not hang (huggingface_hub retries timeouts itself).

The deadline is ``MLX_QWENMOE_HUB_TIMEOUT`` seconds (default 30) for each metadata exchange;
downloads of the files themselves are bounded by huggingface_hub's per-read timeout.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Callable, List, TypeVar

from .errors import ModelNotFoundError

TIMEOUT_ENV = "MLX_QWENMOE_HUB_TIMEOUT"
DEFAULT_TIMEOUT = 30.0
T = TypeVar("T")


def deadline() -> float:
    """Seconds a Hub exchange may take, from ``MLX_QWENMOE_HUB_TIMEOUT``."""
    raw = os.environ.get(TIMEOUT_ENV, "")
    try:
        value = float(raw) if raw else DEFAULT_TIMEOUT
    except ValueError:
        raise ModelNotFoundError(f"{TIMEOUT_ENV}={raw!r}: expected a number of seconds") from None
    if not 0 < value < float("inf"):
        raise ModelNotFoundError(f"{TIMEOUT_ENV}={raw!r}: expected a positive number of seconds")
    return value


def _endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def within_deadline(call: Callable[[], T], what: str) -> T:
    """``call()``, or ``ModelNotFoundError`` naming the deadline if it has not returned by then.

    The call runs in a daemon thread: a stalled socket cannot be interrupted, but it no longer
    holds the caller (or the process's exit) hostage.
    """
    seconds = deadline()
    result: List = []

    def run() -> None:
        try:
            result.append((True, call()))
        except BaseException as e:  # noqa: BLE001  handed to the caller's thread below
            result.append((False, e))

    worker = threading.Thread(target=run, name="hub-call", daemon=True)
    worker.start()
    worker.join(seconds)
    if not result:
        raise ModelNotFoundError(
            f"{what}: the Hugging Face Hub at {_endpoint()} did not answer within {seconds:g} s "
            f"(total deadline; set {TIMEOUT_ENV} to wait longer)"
        )
    ok, value = result[0]
    if not ok:
        raise value
    return value


def _no_local(repo_id: str, reason: str) -> ModelNotFoundError:
    return ModelNotFoundError(f"{repo_id}: no local directory of that name, and {reason}")


def snapshot(repo_id: str, allow_patterns: List[str]) -> Path:
    """The local snapshot of ``repo_id``: the cached one when the Hub cannot be reached."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    def cached(reason: str) -> Path:
        try:
            return Path(snapshot_download(repo_id, allow_patterns=allow_patterns, local_files_only=True))
        except LocalEntryNotFoundError:
            raise _no_local(repo_id, f"it is not in the local Hugging Face cache ({reason})") from None

    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0"):
        return cached("HF_HUB_OFFLINE is set")
    seconds = deadline()
    try:
        within_deadline(lambda: HfApi().repo_info(repo_id, timeout=seconds), repo_id)
    except ModelNotFoundError as e:
        return cached(str(e).split(": ", 1)[1])
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        raise _no_local(repo_id, f"the Hub answers HTTP {status} for it (no such repo, or it needs a token)") from None
    except Exception as e:  # noqa: BLE001  refused, unresolvable, reset: the network is down
        return cached(f"the Hub is unreachable: {type(e).__name__}")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=allow_patterns, etag_timeout=seconds))
    except Exception as e:  # noqa: BLE001  every Hub failure is one line for the user
        raise _no_local(repo_id, f"the download failed ({type(e).__name__}: {e})".splitlines()[0]) from None


def fetch_file(repo_id: str, filename: str) -> Path:
    """One file of ``repo_id`` (the cached copy when the Hub cannot be reached)."""
    from huggingface_hub import hf_hub_download

    seconds = deadline()
    try:
        return Path(within_deadline(lambda: hf_hub_download(repo_id, filename, etag_timeout=seconds), repo_id))
    except ModelNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001  every Hub failure is one line for the user
        raise _no_local(repo_id, f"cannot fetch its {filename} ({type(e).__name__})") from None
