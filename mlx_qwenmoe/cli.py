"""The ``mlx_qwenmoe`` command: ``generate``, ``serve`` and ``convert``."""

from __future__ import annotations

import sys
from typing import Optional, Tuple

import click

from .errors import QwenMoeError


class _Group(click.Group):
    """Report our errors (bad file, tensor, option) as one line and exit 2, like click's usage errors."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except QwenMoeError as e:
            raise click.UsageError(str(e)) from None


@click.group(cls=_Group)
@click.version_option(package_name="mlx_qwenmoe")
def main() -> None:
    """Run Qwen3.5 mixture-of-experts models with MLX."""


@main.command("generate")
@click.option("--model", "model_path", default=None, help="Model directory or Hugging Face repo id. [default: the bundled demo model]")
@click.option("--prompt", default=None, help="Prompt text; omitted or '-' reads it from stdin.")
@click.option("--max-tokens", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--temp", type=click.FloatRange(min=0.0), default=0.0, show_default=True, help="Sampling temperature; 0 is greedy.")
@click.option("--top-p", type=click.FloatRange(0.0, 1.0), default=1.0, show_default=True, help="Nucleus sampling; 1 keeps every token.")
@click.option("--top-k", type=click.IntRange(min=0), default=0, show_default=True, help="0 keeps every token.")
@click.option("--min-p", type=click.FloatRange(0.0, 1.0), default=0.0, show_default=True, help="Drop tokens below this fraction of the top probability.")
@click.option("--repetition-penalty", type=click.FloatRange(min=0.0, min_open=True), default=None, help="Penalty on the last 20 tokens, e.g. 1.1.")
@click.option("--seed", type=int, default=None, help="Random seed for sampling.")
@click.option("--chat/--no-chat", default=None, help="Apply the checkpoint's chat template. [default: when it has one]")
@click.option("--think/--no-think", default=None, help="Qwen3.5 thinking switch (enable_thinking) of the chat template.")
@click.option("--system", default=None, help="System message (chat mode).")
@click.option("--stop", multiple=True, help="Stop before this text; may be repeated.")
@click.option("--prefill-step-size", type=click.IntRange(min=1), default=2048, show_default=True, help="Prompt tokens per forward pass.")
@click.option("--mtp/--no-mtp", default=False, show_default=True, help="Speculative decoding with the checkpoint's MTP head.")
@click.option("--draft-tokens", type=click.IntRange(min=1), default=2, show_default=True, help="Tokens drafted per step with --mtp.")
@click.option("--max-resident", default=None, metavar="SIZE",
              help="Keep at most SIZE (e.g. 6GiB) of routed experts in memory; read the rest from disk as routed.")
@click.option("--prefetch-experts", is_flag=True, help="With --max-resident: read the next layer's predicted experts ahead.")
@click.option("--verbose", is_flag=True, help="Also print expert-streaming stats (hit rate, bytes read per token, prefetch accuracy).")
@click.option("--prompt-cache", "prompt_cache_file", type=click.Path(dir_okay=False), default=None, help="Prompt cache file: reused if it exists, updated after the run.")
@click.option("--prompt-cache-bytes", type=click.IntRange(min=1), default=None, help="Prompt cache budget in bytes. [default: a quarter of the free memory]")
def generate_command(
    model_path: Optional[str],
    prompt: Optional[str],
    max_tokens: int,
    temp: float,
    top_p: float,
    top_k: int,
    min_p: float,
    repetition_penalty: Optional[float],
    seed: Optional[int],
    chat: Optional[bool],
    think: Optional[bool],
    system: Optional[str],
    stop: Tuple[str, ...],
    prefill_step_size: int,
    mtp: bool,
    draft_tokens: int,
    max_resident: Optional[str],
    prefetch_experts: bool,
    verbose: bool,
    prompt_cache_file: Optional[str],
    prompt_cache_bytes: Optional[int],
) -> None:
    """Generate text from a prompt, streaming it to stdout; the stats line goes to stderr."""
    import mlx.core as mx
    from mlx_lm.sample_utils import make_logits_processors, make_sampler

    from .api import chat_prompt_with_boundaries
    from .generate import format_stats, stream_generate

    if prompt is None or prompt == "-":
        if sys.stdin.isatty():
            raise click.UsageError("give --prompt or pipe the prompt on stdin")
        prompt = sys.stdin.read()
    if not prompt:
        raise click.UsageError("--prompt: the prompt is empty")
    model, tokenizer = load_streamed(model_path, max_resident, prefetch_experts)
    if mtp and not model.has_mtp:
        raise click.UsageError("--mtp: the checkpoint has no MTP head (no mtp.* tensors)")
    prompt_cache, boundaries = _open_prompt_cache(prompt_cache_file, prompt_cache_bytes, model), []
    if chat is None:
        chat = tokenizer.has_chat_template
    if chat:
        if not tokenizer.has_chat_template:
            raise click.UsageError("--chat: the checkpoint's tokenizer has no chat template")
        messages = ([{"role": "system", "content": system}] if system is not None else []) + [
            {"role": "user", "content": prompt}
        ]
        prompt, boundaries = chat_prompt_with_boundaries(tokenizer, messages, enable_thinking=think)
    elif system is not None or think is not None:
        raise click.UsageError("--system and --think/--no-think need --chat")
    mtp_stats = None
    if mtp:
        from .sampling import SamplerSpec
        from .speculative import SpecStats

        # Speculative sampling needs the sampler's parameters, not just a function.
        sampler = SamplerSpec(temp, top_p=top_p, min_p=min_p, top_k=top_k)
        mtp_stats = SpecStats()
    else:
        sampler = make_sampler(temp, top_p=top_p, min_p=min_p, top_k=top_k)
    if seed is not None:
        mx.random.seed(seed)

    response = None
    for response in stream_generate(
        model,
        tokenizer,
        prompt,
        max_tokens,
        sampler=sampler,
        logits_processors=make_logits_processors(repetition_penalty=repetition_penalty),
        prefill_step_size=prefill_step_size,
        stop=stop,
        mtp=mtp,
        draft_tokens=draft_tokens,
        mtp_stats=mtp_stats,
        prompt_cache=prompt_cache,
        boundaries=boundaries,
    ):
        click.echo(response.text, nl=False)
    click.echo()
    if response is not None:
        click.echo(format_stats(response), err=True)
    if mtp_stats is not None:
        click.echo(str(mtp_stats), err=True)
    if verbose and max_resident is not None:
        click.echo(model.expert_stream.stats.summary(), err=True)
    if prompt_cache is not None:
        prompt_cache.save(prompt_cache_file)
        click.echo(f"Prompt cache: {response.cached_tokens} prompt tokens reused; {prompt_cache_file} holds {prompt_cache.nbytes} bytes", err=True)


def load_streamed(model_path: Optional[str], max_resident: Optional[str], prefetch_experts: bool = False):
    """``api.load`` with ``--max-resident`` parsed and its errors named after the flag."""
    from .api import load
    from .convert.memory import parse_size
    from .expert_stream import BudgetError

    if max_resident is None:
        return load(model_path)
    try:
        return load(model_path, max_resident=parse_size(max_resident, "--max-resident"), prefetch_experts=prefetch_experts)
    except BudgetError as e:
        raise click.BadParameter(str(e).replace("max_resident=", ""), param_hint="--max-resident") from None


@main.command("serve")
@click.option("--model", "model_path", default=None, help="Model directory or Hugging Face repo id. [default: the bundled demo model]")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True)
@click.option("--mtp/--no-mtp", default=False, show_default=True, help="Speculative decoding with the checkpoint's MTP head, for every request.")
@click.option("--draft-tokens", type=click.IntRange(min=1), default=2, show_default=True, help="Tokens drafted per step with --mtp.")
@click.option("--prompt-cache-bytes", type=click.IntRange(min=1), default=None, help="Prompt cache budget in bytes. [default: a quarter of the free memory]")
@click.option("--max-resident", default=None, metavar="SIZE",
              help="Keep at most SIZE (e.g. 6GiB) of routed experts in memory; read the rest from disk as routed.")
@click.option("--max-batch", type=click.IntRange(min=1), default=8, show_default=True, help="Requests decoded together in one batch (without --mtp).")
@click.option("--max-queue", type=click.IntRange(min=0), default=32, show_default=True, help="Requests waiting beyond those; more get HTTP 503.")
def serve_command(model_path: Optional[str], host: str, port: int, mtp: bool, draft_tokens: int,
                  prompt_cache_bytes: Optional[int], max_resident: Optional[str], max_batch: int, max_queue: int) -> None:
    """Serve the model over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions)."""
    import logging

    import uvicorn

    from .api import resolve
    from .server import Backend, ServerConfig, create_app, sampling_defaults

    model_dir = resolve(model_path)
    model, tokenizer = load_streamed(str(model_dir), max_resident)
    if mtp and not model.has_mtp:
        raise click.UsageError("--mtp: the checkpoint has no MTP head (no mtp.* tensors)")
    prompt_cache = _open_prompt_cache(None, prompt_cache_bytes, model, always=True)
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


# ---- prompt cache: --prompt-cache for generate, and the chat command ----


def _open_prompt_cache(path: Optional[str], max_bytes: Optional[int], model, always: bool = False):
    """The cache in ``path`` if that file exists, else a new one; None without a path unless ``always``."""
    import os

    from .errors import PromptCacheError
    from .prompt_cache import PromptCache

    try:
        fresh = PromptCache(model, max_bytes)
    except PromptCacheError as e:
        raise click.UsageError(f"--prompt-cache-bytes {max_bytes}: {str(e).split(': ', 1)[-1]}") from None
    if path is None or not os.path.exists(path):
        return fresh if path is not None or always else None
    try:
        return PromptCache.load(path, model, max_bytes)
    except PromptCacheError as e:
        raise click.UsageError(f"--prompt-cache: {e}") from None


@main.command("chat")
@click.option("--model", "model_path", default=None, help="Model directory or Hugging Face repo id. [default: the bundled demo model]")
@click.option("--system", default=None, help="System message.")
@click.option("--think/--no-think", default=None, help="Qwen3.5 thinking switch (enable_thinking) of the chat template.")
@click.option("--max-tokens", type=click.IntRange(min=1), default=512, show_default=True, help="Tokens per reply at most.")
@click.option("--temp", type=click.FloatRange(min=0.0), default=0.7, show_default=True, help="Sampling temperature; 0 is greedy.")
@click.option("--top-p", type=click.FloatRange(0.0, 1.0), default=0.9, show_default=True, help="Nucleus sampling; 1 keeps every token.")
@click.option("--seed", type=int, default=None, help="Random seed for sampling.")
@click.option("--mtp/--no-mtp", default=False, show_default=True, help="Speculative decoding with the checkpoint's MTP head.")
@click.option("--prompt-cache", "prompt_cache_file", type=click.Path(dir_okay=False), default=None, help="Start from this prompt cache file if it exists.")
@click.option("--prompt-cache-bytes", type=click.IntRange(min=1), default=None, help="Prompt cache budget in bytes. [default: a quarter of the free memory]")
@click.option("--max-resident", default=None, metavar="SIZE",
              help="Keep at most SIZE (e.g. 6GiB) of routed experts in memory; read the rest from disk as routed.")
def chat_command(
    model_path: Optional[str],
    system: Optional[str],
    think: Optional[bool],
    max_tokens: int,
    temp: float,
    top_p: float,
    seed: Optional[int],
    mtp: bool,
    prompt_cache_file: Optional[str],
    prompt_cache_bytes: Optional[int],
    max_resident: Optional[str],
) -> None:
    """Chat in the terminal, streaming replies; an empty line or end of input quits.

    Each turn reuses every prompt token an earlier turn computed (the line "N prompt tokens,
    M reused" on stderr). Commands: /reset (new conversation), /save FILE and /load FILE
    (the prompt cache)."""
    import mlx.core as mx

    from .chat import ChatSession, run_repl
    from .sampling import SamplerSpec

    model, tokenizer = load_streamed(model_path, max_resident)
    if not tokenizer.has_chat_template:
        raise click.UsageError("--model: the checkpoint's tokenizer has no chat template")
    if seed is not None:
        mx.random.seed(seed)
    session = ChatSession(
        model, tokenizer, system=system, enable_thinking=think,
        prompt_cache=_open_prompt_cache(prompt_cache_file, prompt_cache_bytes, model, always=True),
        max_tokens=max_tokens, sampler=SamplerSpec(temp, top_p=top_p), mtp=mtp,
    )
    run_repl(session, input if sys.stdin.isatty() else _read_line, sys.stdout, sys.stderr)


def _read_line(_prompt: str) -> str:
    """``input`` for piped input: without echoing the prompt into the output."""
    line = sys.stdin.readline()
    if not line:
        raise EOFError
    return line.rstrip("\n")


from mlx_qwenmoe.convert.cli import convert_command  # noqa: E402  the converter lives in its own package

main.add_command(convert_command, name="convert")


# --- doctor: kernel checks and timings for bug reports ---------------------------------
@main.command("doctor")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON (attach it to a bug report).")
@click.option("--repeats", type=click.IntRange(min=1), default=20, show_default=True, help="Timed runs per path on Metal.")
def doctor_command(as_json: bool, repeats: int) -> None:
    """Check every Metal kernel against its MLX twin and time it; exit 1 if any check fails."""
    import json

    from . import doctor

    report = doctor.run(repeats=repeats)
    click.echo(json.dumps(report, indent=2) if as_json else doctor.format_report(report))
    if doctor.failed(report):
        sys.exit(1)
