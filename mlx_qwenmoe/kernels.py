"""Loading the Metal kernels in ``metal/`` and deciding when to use them.

Every kernel has a pure-MLX twin in ``mlx_qwenmoe.ops``; the kernel runs only on
a Metal GPU, and ``MLX_QWENMOE_FORCE_OPS=1`` forces the ops path there too.
Kernels are built lazily so that tests can route ``mx.fast.metal_kernel`` to the
CPU emulator (``tests/metal_emu``) and call ``build.cache_clear()``.

Safety net: a dispatcher uses a kernel only once ``verified`` says it passed its
first-use check in this process (built, run on a small input, compared with its
twin). A kernel that fails to build or disagrees is reported once and the ops
path runs instead from then on, so a bad kernel slows the model down but never
takes it down or makes it wrong.
"""

from __future__ import annotations

import functools
import importlib.resources
import logging
import os
from typing import Callable, Dict, Hashable, Sequence, Set, Tuple

import mlx.core as mx

from .errors import KernelCheckError

FORCE_OPS_ENV = "MLX_QWENMOE_FORCE_OPS"
log = logging.getLogger("mlx_qwenmoe")

_passed: Set[Tuple[str, Hashable]] = set()
_failed: Dict[str, str] = {}  # kernel -> why it is off for the rest of the process


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


def verified(kernel: str, variant: Hashable, check: Callable[[], None]) -> bool:
    """True when ``kernel`` may run: its ``check`` passed for this ``variant`` (template
    arguments and dtypes) in this process. The first failure of any variant logs one
    warning and turns the kernel off for good; ``check`` raises to fail (a build error
    surfaces as RuntimeError or ValueError from MLX, a disagreement as KernelCheckError).
    """
    if kernel in _failed:
        return False
    if (kernel, variant) in _passed:
        return True
    try:
        check()
    except (RuntimeError, ValueError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        _failed[kernel] = reason
        log.warning("Metal kernel %s failed its self-check (%s); using the MLX ops path instead", kernel, reason)
        return False
    _passed.add((kernel, variant))
    return True


def failed_kernels() -> Dict[str, str]:
    """Kernels turned off by the safety net in this process, with the reason."""
    return dict(_failed)


def reset() -> None:
    """Forget built kernels and check results (tests switch between the emulator and MLX)."""
    build.cache_clear()
    _passed.clear()
    _failed.clear()


def assert_close(what: str, got: mx.array, want: mx.array, rtol: float) -> None:
    """Raise KernelCheckError unless |got - want| <= rtol * max|want| everywhere (and got is finite)."""
    got32, want32 = got.astype(mx.float32), want.astype(mx.float32)
    scale = max(mx.abs(want32).max().item(), 1e-6)
    err = mx.abs(got32 - want32).max().item()
    if not (err <= rtol * scale):  # also catches NaN
        raise KernelCheckError(f"{what} differs from the ops twin: max error {err:.3g}, {err / scale:.3g} of max |value|")
