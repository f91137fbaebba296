"""Make MLX's CPU backend use the system OpenBLAS on Linux.

The ``mlx[cpu]`` wheel links the reference (netlib) BLAS and LAPACK, about 40x
slower than OpenBLAS for the matmuls the chunked delta rule and the model run.
Loading ``libopenblas.so.0`` with RTLD_GLOBAL before ``mlx.core`` makes the
dynamic linker resolve MLX's ``cblas_*`` and LAPACK symbols to it; results are
unchanged. This only works before ``mlx.core`` is loaded, so it is skipped
otherwise, and when the library is absent (Debian: ``libopenblas0-pthread``).
Opt out with ``MLX_QWENMOE_NO_OPENBLAS=1``.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

OPT_OUT_ENV = "MLX_QWENMOE_NO_OPENBLAS"
_LIBRARY = "libopenblas.so.0"

log = logging.getLogger(__name__)


def preload_openblas() -> bool:
    """Load OpenBLAS globally if that can still take effect. True when it was loaded."""
    if not sys.platform.startswith("linux"):
        return False
    if os.environ.get(OPT_OUT_ENV, "0") not in ("", "0"):
        log.debug("OpenBLAS preload disabled by %s", OPT_OUT_ENV)
        return False
    if "mlx.core" in sys.modules:
        log.debug("mlx.core already imported; OpenBLAS preload skipped")
        return False
    try:
        ctypes.CDLL(_LIBRARY, mode=ctypes.RTLD_GLOBAL)
    except OSError:
        log.debug("%s not found; MLX keeps its bundled BLAS", _LIBRARY)
        return False
    log.debug("loaded %s for MLX's CPU BLAS/LAPACK", _LIBRARY)
    return True


preload_openblas()
