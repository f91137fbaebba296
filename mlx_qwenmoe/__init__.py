"""mlx_qwenmoe."""

from .api import load
from .generate import GenerationResponse, generate, generate_step, stream_generate

__all__ = ["GenerationResponse", "generate", "generate_step", "load", "stream_generate"]
