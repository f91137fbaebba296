"""Test setup: make the adopted MSL emulator (tests/metal_emu) importable and
keep its compiled kernels in a directory CI can cache between runs."""

import os
import sys

_TESTS = os.path.dirname(os.path.abspath(__file__))
_REPO = os.path.dirname(_TESTS)

sys.path.insert(0, os.path.join(_TESTS, "metal_emu"))
os.environ.setdefault("METAL_EMU_CACHE", os.path.join(_REPO, ".cache", "metal_emu"))
