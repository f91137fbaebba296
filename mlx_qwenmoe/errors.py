"""Exceptions users see: each carries a one-line message naming the file, tensor or option at fault."""


class QwenMoeError(Exception):
    """Base class for errors the CLI reports as one line."""


class ConfigError(QwenMoeError, ValueError):
    """config.json is missing, unreadable, or describes something we do not run."""


class CheckpointError(QwenMoeError, ValueError):
    """A weight file or tensor is missing, malformed, or of the wrong shape."""


class ModelNotFoundError(QwenMoeError, FileNotFoundError):
    """Neither a local directory nor a reachable Hugging Face repository."""


class OutputError(QwenMoeError, OSError):
    """An output directory exists, cannot be written, or has too little free space."""


class KernelCheckError(QwenMoeError, RuntimeError):
    """A Metal kernel computed something other than its pure-MLX twin on a check input."""
class PromptCacheError(QwenMoeError, ValueError):
    """A prompt cache file is unreadable or belongs to another model, or a cache budget is too small."""
