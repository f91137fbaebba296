"""The ``mlx_qwenmoe`` command: ``generate`` and ``convert``."""

from __future__ import annotations

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


from mlx_qwenmoe.convert.cli import convert_command  # noqa: E402  the converter lives in its own package

main.add_command(convert_command, name="convert")
