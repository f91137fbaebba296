"""``mlx_qwenmoe serve``: the OpenAI-compatible HTTP server."""

from __future__ import annotations

from typing import Optional

import click

from .options import MAX_RESIDENT_HELP, MODEL_HELP, load_streamed, open_prompt_cache


@click.command("serve")
@click.option("--model", "model_path", default=None, help=MODEL_HELP)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True)
@click.option("--mtp/--no-mtp", default=False, show_default=True, help="Speculative decoding with the checkpoint's MTP head, for every request.")
@click.option("--draft-tokens", type=click.IntRange(min=1), default=2, show_default=True, help="Tokens drafted per step with --mtp.")
@click.option("--prompt-cache-bytes", type=click.IntRange(min=1), default=None, help="Prompt cache budget in bytes. [default: a quarter of the free memory]")
@click.option("--max-resident", default=None, metavar="SIZE", help=MAX_RESIDENT_HELP)
@click.option("--max-batch", type=click.IntRange(min=1), default=8, show_default=True, help="Requests decoded together in one batch (without --mtp).")
@click.option("--max-queue", type=click.IntRange(min=0), default=32, show_default=True, help="Requests waiting beyond those; more get HTTP 503.")
def serve_command(model_path: Optional[str], host: str, port: int, mtp: bool, draft_tokens: int,
                  prompt_cache_bytes: Optional[int], max_resident: Optional[str], max_batch: int, max_queue: int) -> None:
    """Serve the model over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions)."""
    import logging

    import uvicorn

    from ..api import resolve
    from ..server import Backend, ServerConfig, create_app, sampling_defaults

    model_dir = resolve(model_path)
    model, tokenizer = load_streamed(str(model_dir), max_resident)
    if mtp and not model.has_mtp:
        raise click.UsageError("--mtp: the checkpoint has no MTP head (no mtp.* tensors)")
    prompt_cache = open_prompt_cache(None, prompt_cache_bytes, model, always=True)
    config = ServerConfig(
        model_id=model_path or "default_model",
        context_length=model.args.max_position_embeddings,
        vocab_size=model.args.vocab_size,
        sampling_defaults=sampling_defaults(model_dir),
        max_batch=max_batch,
        max_queue=max_queue,
    )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    backend = Backend(model, tokenizer, mtp=mtp, draft_tokens=draft_tokens, prompt_cache=prompt_cache)
    app = create_app(backend, config)
    click.echo(f"serving '{config.model_id}' on http://{host}:{port}/v1", err=True)
    uvicorn.run(app, host=host, port=port, log_level="info")
