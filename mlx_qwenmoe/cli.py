"""The ``mlx_qwenmoe`` command: ``generate`` and ``convert``."""

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
    parallel: Optional[str],
) -> None:
    """Generate text from a prompt, streaming it to stdout; the stats line goes to stderr."""
    import mlx.core as mx
    from mlx_lm.sample_utils import make_logits_processors, make_sampler

    from .api import chat_prompt, load
    from .generate import format_stats, stream_generate

    if prompt is None or prompt == "-":
        if sys.stdin.isatty():
            raise click.UsageError("give --prompt or pipe the prompt on stdin")
        prompt = sys.stdin.read()
    if not prompt:
        raise click.UsageError("--prompt: the prompt is empty")
    model, tokenizer = load(model_path, parallel=parallel)
    if chat is None:
        chat = tokenizer.has_chat_template
    if chat:
        if not tokenizer.has_chat_template:
            raise click.UsageError("--chat: the checkpoint's tokenizer has no chat template")
        messages = ([{"role": "system", "content": system}] if system is not None else []) + [
            {"role": "user", "content": prompt}
        ]
        prompt = chat_prompt(tokenizer, messages, enable_thinking=think)
    elif system is not None or think is not None:
        raise click.UsageError("--system and --think/--no-think need --chat")
    mtp_stats = None
    if mtp:
        from .speculative import SamplerSpec, SpecStats

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
    ):
        click.echo(response.text, nl=False)
    click.echo()
    if response is not None:
        click.echo(format_stats(response), err=True)
    if mtp_stats is not None:
        click.echo(str(mtp_stats), err=True)


@main.command("plan")
@click.option("--model", "model", required=True, help="config.json, a model directory, or a Hugging Face repo id (only config.json is fetched).")
@click.option("--hosts", required=True, help="NAME:RAM per rank, e.g. mac1:64GB,mac2:24GB; NAME:RAM@LIMIT when the GPU wired limit is raised.")
@click.option("--context", type=click.IntRange(min=0), default=32768, show_default=True, help="Tokens of cache to plan for.")
@click.option("--parallel", type=click.Choice(["expert", "pipeline", "expert+pipeline"]), default="expert", show_default=True)
@click.option("--bits", type=int, default=4, show_default=True, help="Quantization of the weights (the converter's recipe).")
@click.option("--group-size", type=int, default=64, show_default=True)
def plan_command(model: str, hosts: str, context: int, parallel: str, bits: int, group_size: int) -> None:
    """Plan a distributed run: per-rank weights, cache and headroom, and bytes per token."""
    from .distributed.plan import model_config, parse_hosts, plan_distributed

    config, source = model_config(model)
    plan = plan_distributed(config, parse_hosts(hosts), mode=parallel, context=context, bits=bits,
                            group_size=group_size, source=source)
    click.echo(plan.summary())
    problem = plan.problem()
    if problem is not None:
        raise click.ClickException(f"does not fit: {problem}")


from mlx_qwenmoe.convert.cli import convert_command  # noqa: E402  the converter lives in its own package

main.add_command(convert_command, name="convert")
