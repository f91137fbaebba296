"""``mlx_qwenmoe convert SRC DST``: the command-line face of ``mlx_qwenmoe.convert.convert``."""

from __future__ import annotations

import signal
import sys
from typing import Optional

import click

from .memory import parse_size
from .plan import BITS, DEFAULT_CONTEXT, DEFAULT_RESERVE, DTYPES, GROUP_SIZES


@click.command()
@click.argument("src")
@click.argument("dst", required=False)
@click.option("--bits", type=click.Choice([str(b) for b in BITS]), default=None,
              help="Bits of the affine quantization. [default: 4]")
@click.option("--group-size", type=click.Choice([str(g) for g in GROUP_SIZES]), default="64", show_default=True)
@click.option("--fit", default=None, metavar="RAM",
              help="Choose per-tensor bits so weights + cache fit a Mac with this RAM, e.g. 24GB (binary units).")
@click.option("--context", type=click.IntRange(min=0), default=DEFAULT_CONTEXT, show_default=True,
              help="Tokens of KV/state cache the plan reserves memory for.")
@click.option("--reserve", default=f"{DEFAULT_RESERVE >> 20}MB", show_default=True,
              help="Memory kept free for activations with --fit.")
@click.option("--dtype", type=click.Choice(list(DTYPES)), default=None,
              help="Float dtype of unquantized tensors, scales and biases. [default: the config's]")
@click.option("--dry-run", is_flag=True, help="Print the plan only; SRC may be a config.json or a repo id (no weights fetched).")
@click.option("--force", is_flag=True, help="Replace DST if it exists (an empty or model directory only).")
@click.option("--quiet", is_flag=True, help="No progress bar (there is none when stderr is not a terminal).")
def convert_command(
    src: str, dst: Optional[str], bits: Optional[str], group_size: str, fit: Optional[str], context: int,
    reserve: str, dtype: Optional[str], dry_run: bool, force: bool, quiet: bool,
) -> None:
    """Quantize the Hugging Face checkpoint SRC (directory or repo id) into the mlx-lm directory DST.

    The plan (bits per tensor class, bytes, memory headroom) is printed before anything is written.
    """
    from .pipeline import convert

    # A killed conversion (SIGTERM) unwinds like Ctrl-C, so its partial output is removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    if fit is not None and bits is not None:
        raise click.UsageError("--fit chooses the bits itself; give --fit or --bits, not both")
    if dst is None and not dry_run:
        raise click.UsageError("missing DST (or give --dry-run)")
    convert(
        src, dst, bits=int(bits or 4), group_size=int(group_size), fit=fit, context=context,
        reserve=parse_size(reserve, "--reserve"), dtype=dtype, dry_run=dry_run, force=force, log=click.echo,
        progress=not quiet and sys.stderr.isatty(),
    )
