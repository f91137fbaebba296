"""mlx_qwenmoe."""

from . import _blas  # noqa: F401  (first: must run before mlx.core loads)
from .api import load
from .batch import BatchEngine, batch_generate
from .generate import GenerationResponse, generate, generate_step, stream_generate

__all__ = [
    "BatchEngine",
    "GenerationResponse",
    "batch_generate",
    "generate",
    "generate_step",
    "load",
    "stream_generate",
]
