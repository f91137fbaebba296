"""Test setup: make the adopted MSL emulator (``tests/metal_emu``) importable.

The emulator keeps its compiled kernels in ``$METAL_EMU_CACHE``, by default
``<repo>/.cache/metal_emu`` (git-ignored), a directory CI can cache between runs.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "metal_emu"))

# Import the package before any test module imports mlx.core, so that on Linux MLX's CPU
# backend picks up the system OpenBLAS (see mlx_qwenmoe/_blas.py): the suite runs on it.
import mlx_qwenmoe  # noqa: E402,F401

# Every kernel test runs its kernels in the emulator's strict mode (a divergent SIMD collective, a
# barrier some threads have already left, or a device-memory read of another SIMD-group's write
# without a mem_device barrier is an error) on one shuffled schedule.
STRICT_EMU = dict(strict=True, shuffle=True, seed=12)
# Property-based tests (test_fuzz_*.py): a fixed budget and seed in CI, as long as you like with
# MLX_QWENMOE_FUZZ=long (e.g. MLX_QWENMOE_FUZZ=long HYPOTHESIS_MAX_EXAMPLES=200000).
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile("ci", max_examples=100, derandomize=True, deadline=None, database=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=int(os.environ.get("HYPOTHESIS_MAX_EXAMPLES", "20000")),
                          derandomize=False, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("long" if os.environ.get("MLX_QWENMOE_FUZZ") == "long" else "ci")
