"""mlx_qwenmoe."""

import importlib
import sys
import types

from . import _blas  # noqa: F401  (first: must run before mlx.core loads)

__all__ = ["BatchEngine", "GenerationResponse", "batch_generate", "generate", "generate_step", "load", "stream_generate"]

# Imported on first use (PEP 562), so that the command line starts, and answers Ctrl-C, before MLX loads.
_LAZY = {"load": "api", "GenerationResponse": "generate", "generate": "generate", "generate_step": "generate",
         "stream_generate": "generate", "BatchEngine": "batch", "batch_generate": "batch"}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value) -> None:
        # Importing the submodule ``generate`` binds it here; ``mlx_qwenmoe.generate`` stays the function.
        if name in _LAZY and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
