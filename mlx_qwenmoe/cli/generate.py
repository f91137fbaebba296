"""``mlx_qwenmoe generate``: one prompt, streamed to stdout."""

from __future__ import annotations

import sys
import warnings
from typing import Any, Optional, Tuple

import click

from .options import MAX_RESIDENT_HELP, MODEL_HELP, Finite, load_streamed, open_prompt_cache, read_prompt, show_warning


@click.command("generate")
@click.option("--model", "model_path", default=None, help=MODEL_HELP)
@click.option("--prompt", default=None, help="Prompt text; omitted or '-' reads it from stdin.")
@click.option("--max-tokens", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--temp", type=Finite(min=0.0), default=0.0, show_default=True, help="Sampling temperature; 0 is greedy.")
@click.option("--top-p", type=Finite(0.0, 1.0), default=1.0, show_default=True, help="Nucleus sampling; 1 keeps every token.")
@click.option("--top-k", type=click.IntRange(min=0), default=0, show_default=True, help="0 (or the vocabulary size or more) keeps every token.")
@click.option("--min-p", type=Finite(0.0, 1.0), default=0.0, show_default=True, help="Drop tokens below this fraction of the top probability.")
@click.option("--repetition-penalty", type=Finite(min=0.0, min_open=True), default=None, help="Penalty on the last 20 tokens, e.g. 1.1.")
@click.option("--seed", type=click.IntRange(0, 2**64 - 1), default=None, help="Random seed for sampling.")
@click.option("--chat/--no-chat", default=None, help="Apply the checkpoint's chat template. [default: when it has one]")
@click.option("--think/--no-think", default=None, help="Qwen3.5 thinking switch (enable_thinking) of the chat template.")
@click.option("--system", default=None, help="System message (chat mode).")
@click.option("--stop", multiple=True, help="Stop before this text; may be repeated.")
@click.option("--prefill-step-size", type=click.IntRange(min=1), default=2048, show_default=True, help="Prompt tokens per forward pass.")
@click.option("--mtp/--no-mtp", default=False, show_default=True, help="Speculative decoding with the checkpoint's MTP head.")
@click.option("--draft-tokens", type=click.IntRange(min=1), default=2, show_default=True, help="Tokens drafted per step with --mtp.")
@click.option("--max-resident", default=None, metavar="SIZE", help=MAX_RESIDENT_HELP)
@click.option("--prefetch-experts", is_flag=True, help="With --max-resident: read the next layer's predicted experts ahead.")
@click.option("--verbose", is_flag=True, help="Also print expert-streaming stats (hit rate, bytes read per token, prefetch accuracy).")
@click.option("--prompt-cache", "prompt_cache_file", type=click.Path(dir_okay=False), default=None, help="Prompt cache file: reused if it exists, updated after the run.")
@click.option("--prompt-cache-bytes", type=click.IntRange(min=1), default=None, help="Prompt cache budget in bytes. [default: a quarter of the free memory]")
@click.option("--quiet", is_flag=True, help="No prefill progress (there is none when stderr is not a terminal).")
@click.option("--parallel", type=click.Choice(["expert", "pipeline", "expert+pipeline"]), default=None,
              help="Under mlx.launch: how the ranks split the model. [default: expert]")
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
    quiet: bool,
    parallel: Optional[str],
) -> None:
    """Generate text from a prompt, streaming it to stdout; the stats line goes to stderr."""
    import mlx.core as mx
    from mlx_lm.sample_utils import make_logits_processors

    from ..generate import stream_generate

    prompt = read_prompt(prompt)
    warnings.showwarning = show_warning
    model, tokenizer = load_streamed(model_path, max_resident, prefetch_experts, parallel)
    if mtp and not model.has_mtp:
        raise click.UsageError("--mtp: the checkpoint has no MTP head (no mtp.* tensors)")
    if top_k >= model.args.vocab_size:
        top_k = 0  # keeping at least every token is keeping all of them
    prompt_cache = open_prompt_cache(prompt_cache_file, prompt_cache_bytes, model)
    prompt, boundaries = _render(tokenizer, prompt, chat, think, system)
    sampler, mtp_stats = _sampler(mtp, temp, top_p, min_p, top_k)
    if seed is not None:
        mx.random.seed(seed)
    response = None
    for response in stream_generate(
        model, tokenizer, prompt, max_tokens, sampler=sampler,
        logits_processors=make_logits_processors(repetition_penalty=repetition_penalty),
        prefill_step_size=prefill_step_size, stop=stop, mtp=mtp, draft_tokens=draft_tokens, mtp_stats=mtp_stats,
        prompt_cache=prompt_cache, boundaries=boundaries, prefill_progress=not quiet and sys.stderr.isatty(),
    ):
        click.echo(response.text, nl=False)
    click.echo()
    _report(response, mtp_stats, model if verbose and max_resident is not None else None)
    if prompt_cache is not None:
        prompt_cache.save(prompt_cache_file)
        click.echo(f"Prompt cache: {response.cached_tokens} prompt tokens reused; "
                   f"{prompt_cache_file} holds {prompt_cache.nbytes} bytes", err=True)


def _render(tokenizer: Any, prompt: str, chat: Optional[bool], think: Optional[bool], system: Optional[str]):
    """(prompt, message boundaries): the text as given, or rendered with the chat template."""
    from ..api import chat_prompt_with_boundaries

    if chat is None:
        chat = tokenizer.has_chat_template
    if not chat:
        if system is not None or think is not None:
            raise click.UsageError("--system and --think/--no-think need --chat")
        return prompt, []
    if not tokenizer.has_chat_template:
        raise click.UsageError("--chat: the checkpoint's tokenizer has no chat template")
    messages = ([{"role": "system", "content": system}] if system is not None else []) + [
        {"role": "user", "content": prompt}
    ]
    return chat_prompt_with_boundaries(tokenizer, messages, enable_thinking=think)


def _sampler(mtp: bool, temp: float, top_p: float, min_p: float, top_k: int):
    """(sampler, MTP statistics or None). Speculative sampling needs the sampler's parameters,
    not just a function, so --mtp gets a ``SamplerSpec``."""
    from mlx_lm.sample_utils import make_sampler

    if not mtp:
        return make_sampler(temp, top_p=top_p, min_p=min_p, top_k=top_k), None
    from ..sampling import SamplerSpec
    from ..speculative import SpecStats

    return SamplerSpec(temp, top_p=top_p, min_p=min_p, top_k=top_k), SpecStats()


def _report(response: Any, mtp_stats: Any, streamed_model: Any) -> None:
    from ..generate import format_stats

    if response is not None:
        click.echo(format_stats(response), err=True)
    if mtp_stats is not None:
        click.echo(str(mtp_stats), err=True)
    if streamed_model is not None:
        click.echo(streamed_model.expert_stream.stats.summary(), err=True)
