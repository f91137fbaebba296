"""A Hub that accepts connections and never answers fails in the stated deadline, with one line."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading

import pytest


@pytest.fixture
def silent_hub():
    """A local endpoint that accepts every connection and never replies."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    held = []
    stop = threading.Event()

    def accept():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    server.close()


@pytest.mark.parametrize("args", [
    ("generate", "--model", "someorg/somerepo", "--prompt", "hi"),
    ("convert", "someorg/somerepo", "--dry-run"),
])
def test_stalled_hub_fails_within_the_deadline(silent_hub, tmp_path, args):
    env = dict(os.environ, HF_ENDPOINT=silent_hub, HF_HOME=str(tmp_path), MLX_QWENMOE_HUB_TIMEOUT="2")
    env.pop("HF_HUB_OFFLINE", None)
    proc = subprocess.run([sys.executable, "-m", "mlx_qwenmoe", *args], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("Error: someorg/somerepo: ")
    assert (f"the Hugging Face Hub at {silent_hub} did not answer within 2 s "
            "(total deadline; set MLX_QWENMOE_HUB_TIMEOUT to wait longer)") in line
