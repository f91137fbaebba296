"""``mlx_qwenmoe chat``: a streaming multi-turn chat in the terminal, on the prompt cache."""

from __future__ import annotations

import sys
from typing import Optional

import click

from .options import MAX_RESIDENT_HELP, MODEL_HELP, Finite, load_streamed, open_prompt_cache


@click.command("chat")
@click.option("--model", "model_path", default=None, help=MODEL_HELP)
@click.option("--system", default=None, help="System message.")
@click.option("--think/--no-think", default=None, help="Qwen3.5 thinking switch (enable_thinking) of the chat template.")
@click.option("--max-tokens", type=click.IntRange(min=1), default=512, show_default=True, help="Tokens per reply at most.")
@click.option("--temp", type=Finite(min=0.0), default=0.7, show_default=True, help="Sampling temperature; 0 is greedy.")
@click.option("--top-p", type=Finite(0.0, 1.0), default=0.9, show_default=True, help="Nucleus sampling; 1 keeps every token.")
@click.option("--seed", type=click.IntRange(0, 2**64 - 1), default=None, help="Random seed for sampling.")
@click.option("--mtp/--no-mtp", default=False, show_default=True, help="Speculative decoding with the checkpoint's MTP head.")
@click.option("--prompt-cache", "prompt_cache_file", type=click.Path(dir_okay=False), default=None, help="Start from this prompt cache file if it exists.")
@click.option("--prompt-cache-bytes", type=click.IntRange(min=1), default=None, help="Prompt cache budget in bytes. [default: a quarter of the free memory]")
@click.option("--max-resident", default=None, metavar="SIZE", help=MAX_RESIDENT_HELP)
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

    from ..chat import ChatSession, run_repl
    from ..sampling import SamplerSpec

    model, tokenizer = load_streamed(model_path, max_resident)
    if not tokenizer.has_chat_template:
        raise click.UsageError("--model: the checkpoint's tokenizer has no chat template")
    if seed is not None:
        mx.random.seed(seed)
    session = ChatSession(
        model, tokenizer, system=system, enable_thinking=think,
        prompt_cache=open_prompt_cache(prompt_cache_file, prompt_cache_bytes, model, always=True),
        max_tokens=max_tokens, sampler=SamplerSpec(temp, top_p=top_p), mtp=mtp,
    )
    run_repl(session, input if sys.stdin.isatty() else _read_line, sys.stdout, sys.stderr)


def _read_line(_prompt: str) -> str:
    """``input`` for piped input: without echoing the prompt into the output."""
    line = sys.stdin.readline()
    if not line:
        raise EOFError
    return line.rstrip("\n")
