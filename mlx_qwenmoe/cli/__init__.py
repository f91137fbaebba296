"""The ``mlx_qwenmoe`` command: one module per subcommand, each imported only when it runs
(so the command line starts, and answers Ctrl-C, before MLX loads)."""

from __future__ import annotations

import errno
import importlib
import os
import re
import sys

import click

from ..errors import QwenMoeError

# command name -> (module, attribute) of its click command
COMMANDS = {
    "generate": ("mlx_qwenmoe.cli.generate", "generate_command"),
    "chat": ("mlx_qwenmoe.cli.chat", "chat_command"),
    "serve": ("mlx_qwenmoe.cli.serve", "serve_command"),
    "convert": ("mlx_qwenmoe.convert.cli", "convert_command"),
    "plan": ("mlx_qwenmoe.cli.plan", "plan_command"),
    "doctor": ("mlx_qwenmoe.cli.doctor", "doctor_command"),
}


# Library errors name the library's own arguments (``bits 5: ...``, ``pass force=True``); on the
# command line those are flags.
FLAGS = {
    "bits": "--bits", "group_size": "--group-size", "dtype": "--dtype", "context": "--context",
    "reserve": "--reserve", "fit": "--fit", "hosts": "--hosts", "max_resident": "--max-resident",
    "force": "--force", "dry_run": "--dry-run",
}


def as_flags(message: str) -> str:
    """A library error as the command line says it: a leading argument name, and ``NAME=True``
    anywhere, become the flag."""
    message = re.sub(r"\b(\w+)=True\b", lambda m: FLAGS.get(m.group(1), m.group(0)), message)
    lead = re.match(r"(\w+)(?=[ :])", message)
    if lead and lead.group(1) in FLAGS:
        message = FLAGS[lead.group(1)] + message[lead.end():]
    return message


class _Group(click.Group):
    """Report our errors (bad file, tensor, option) as one line and exit 2, like click's usage errors;
    Ctrl-C exits 130 and a full or closed stdout exits 1, each without a traceback."""

    def list_commands(self, ctx: click.Context):
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str):
        if name not in COMMANDS:
            return None
        module, attr = COMMANDS[name]
        return getattr(importlib.import_module(module), attr)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except QwenMoeError as e:
            raise click.UsageError(as_flags(str(e))) from None
        except KeyboardInterrupt:
            sys.stderr.write("\ninterrupted\n")
            sys.exit(130)
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EPIPE, errno.EIO, errno.EDQUOT):
                raise
            _quiet_stdout()
            click.echo(f"Error: cannot write the output ({e.strerror})", err=True)
            sys.exit(1)


def _quiet_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush of a failed stdout raises nothing."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):
        pass


@click.group(cls=_Group)
@click.version_option(package_name="mlx_qwenmoe")
def main() -> None:
    """Run Qwen3.5 mixture-of-experts models with MLX."""
