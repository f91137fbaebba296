"""``mlx_qwenmoe doctor``: kernel checks and timings for bug reports."""

from __future__ import annotations

import sys

import click


@click.command("doctor")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON (attach it to a bug report).")
@click.option("--repeats", type=click.IntRange(min=1), default=20, show_default=True, help="Timed runs per path on Metal.")
def doctor_command(as_json: bool, repeats: int) -> None:
    """Check every Metal kernel against its MLX twin and time it; exit 1 if any check fails."""
    import json

    from .. import doctor

    report = doctor.run(repeats=repeats)
    click.echo(json.dumps(report, indent=2) if as_json else doctor.format_report(report))
    if doctor.failed(report):
        sys.exit(1)
