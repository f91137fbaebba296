"""``mlx_qwenmoe serve``: the OpenAI-compatible HTTP server."""

from __future__ import annotations

from typing import Optional

import click

from .options import MODEL_HELP


@click.command("serve")
@click.option("--model", "model_path", default=None, help=MODEL_HELP)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True)
@click.option("--mtp/--no-mtp", default=False, show_default=True, help="Speculative decoding with the checkpoint's MTP head, for every request.")
@click.option("--draft-tokens", type=click.IntRange(min=1), default=2, show_default=True, help="Tokens drafted per step with --mtp.")
def serve_command(model_path: Optional[str], host: str, port: int, mtp: bool, draft_tokens: int) -> None:
    """Serve the model over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions)."""
    import logging

    import uvicorn

    from ..api import load, resolve
    from ..server import Backend, ServerConfig, create_app, sampling_defaults

    model_dir = resolve(model_path)
    model, tokenizer = load(model_dir)
    if mtp and not model.has_mtp:
        raise click.UsageError("--mtp: the checkpoint has no MTP head (no mtp.* tensors)")
    config = ServerConfig(
        model_id=model_path or "default_model",
        context_length=model.args.max_position_embeddings,
        vocab_size=model.args.vocab_size,
        sampling_defaults=sampling_defaults(model_dir),
    )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    app = create_app(Backend(model, tokenizer, mtp=mtp, draft_tokens=draft_tokens), config)
    click.echo(f"serving '{config.model_id}' on http://{host}:{port}/v1", err=True)
    uvicorn.run(app, host=host, port=port, log_level="info")
