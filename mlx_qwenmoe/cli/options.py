"""What several subcommands share: option types, the prompt, loading with --max-resident, the prompt cache file."""

from __future__ import annotations

import math
import os
import sys
from typing import Any, Optional, Tuple

import click

MODEL_HELP = "Model directory or Hugging Face repo id. [default: the bundled demo model]"
MAX_RESIDENT_HELP = "Keep at most SIZE (e.g. 6GiB) of routed experts in memory; read the rest from disk as routed."


class Finite(click.FloatRange):
    """A float range that also refuses nan and infinities (which pass FloatRange's comparisons)."""

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return number


def read_prompt(prompt: Optional[str]) -> str:
    """The prompt from --prompt or stdin, as valid text."""
    where = "--prompt"
    if prompt is None or prompt == "-":
        if sys.stdin.isatty():
            raise click.UsageError("give --prompt or pipe the prompt on stdin")
        where = "stdin"
        try:
            prompt = sys.stdin.read()
        except UnicodeDecodeError:
            prompt = "\udcff"  # reported below, as the surrogate-escaped case is
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes arrive as lone surrogates
        raise click.UsageError(f"{where}: the prompt is not valid UTF-8 text") from None
    if not prompt:
        raise click.UsageError("--prompt: the prompt is empty")
    return prompt


def show_warning(message, *_args, **_kwargs) -> None:
    click.echo(f"Warning: {message}", err=True)


def load_streamed(
    model_path: Optional[str], max_resident: Optional[str], prefetch_experts: bool = False, parallel: Optional[str] = None
) -> Tuple[Any, Any]:
    """``api.load`` with ``--max-resident`` parsed and its errors named after the flag."""
    from ..api import load
    from ..convert.memory import parse_size
    from ..expert_stream import BudgetError

    if max_resident is None:
        return load(model_path, parallel=parallel)
    try:
        return load(model_path, max_resident=parse_size(max_resident, "--max-resident"), prefetch_experts=prefetch_experts)
    except BudgetError as e:
        raise click.BadParameter(str(e).replace("max_resident=", ""), param_hint="--max-resident") from None
    except ValueError as e:
        raise click.BadParameter(str(e).replace("max_resident: ", ""), param_hint="--max-resident") from None


def open_prompt_cache(path: Optional[str], max_bytes: Optional[int], model, always: bool = False):
    """The cache in ``path`` if that file exists, else a new one; None without a path unless ``always``."""
    from ..errors import PromptCacheError
    from ..prompt_cache import PromptCache

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
