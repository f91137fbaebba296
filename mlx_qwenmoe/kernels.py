"""Loading the Metal kernels in ``metal/`` and deciding when to use them.

Every kernel has a pure-MLX twin in ``mlx_qwenmoe.ops``; the kernel runs only on
a Metal GPU, and ``MLX_QWENMOE_FORCE_OPS=1`` forces the ops path there too.
Kernels are built lazily so that tests can route ``mx.fast.metal_kernel`` to the
CPU emulator (``tests/metal_emu``) and call ``build.cache_clear()``.
"""

from __future__ import annotations

import functools
import importlib.resources
import os
from typing import Callable, Sequence

import mlx.core as mx

FORCE_OPS_ENV = "MLX_QWENMOE_FORCE_OPS"


def metal_source(name: str) -> str:
    """The MSL body of ``metal/<name>.metal``."""
    return (importlib.resources.files("mlx_qwenmoe.metal") / f"{name}.metal").read_text()


def use_metal() -> bool:
    """True when kernels should run: a Metal GPU is the default device and not forced off."""
    if os.environ.get(FORCE_OPS_ENV, "0") not in ("", "0"):
        return False
    return mx.metal.is_available() and mx.default_device() == mx.gpu


@functools.lru_cache(maxsize=None)
def build(
    name: str,
    input_names: Sequence[str],
    output_names: Sequence[str],
    header: str = "",
) -> Callable:
    """The ``mx.fast.metal_kernel`` for ``metal/<name>.metal`` (names as tuples)."""
    return mx.fast.metal_kernel(
        name=name,
        input_names=list(input_names),
        output_names=list(output_names),
        source=metal_source(name),
        header=header,
    )
