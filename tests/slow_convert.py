"""``mlx_qwenmoe convert`` announcing on stdout every written tensor and the final rename, with a
pause at the points tests signal (tensors 1 and 20, the rename), so a test can send a real signal
at a known point of the conversion.

Usage: ``python tests/slow_convert.py SRC DST [convert options]``.
"""

import sys
import time

from mlx_qwenmoe.cli import main
from mlx_qwenmoe.convert import destination, pipeline

_emit, _finish = pipeline._Emitter.__call__, destination.finish
_count = [0]


def _slow_emit(self, *args):
    _emit(self, *args)
    _count[0] += 1
    print(f"@emit {_count[0]}", flush=True)
    if _count[0] in (1, 20):
        time.sleep(0.5)


def _slow_finish(*args):
    print("@finish", flush=True)
    time.sleep(0.5)
    _finish(*args)


pipeline._Emitter.__call__ = _slow_emit
destination.finish = _slow_finish
sys.exit(main(["convert", *sys.argv[1:]]))
