"""``mlx_qwenmoe serve``: an OpenAI-compatible HTTP server (FastAPI + uvicorn).

app.py (routes), schemas.py (request bodies), prompt.py (chat template), stream_parser.py
(thinking and tool calls), backend.py (sampling, steps, the serial generation call),
worker.py (the generation thread, serial) and batch_worker.py (the same, continuous
batching), openai_format.py (response shapes), http_errors.py (error bodies).
"""

from .app import ServerConfig, create_app
from .backend import Backend, sampling_defaults

__all__ = ["Backend", "ServerConfig", "create_app", "sampling_defaults"]
