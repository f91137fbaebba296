"""``mlx_qwenmoe plan``: how a model splits over several Macs."""

from __future__ import annotations

import click


@click.command("plan")
@click.option("--model", "model", required=True, help="config.json, a model directory, or a Hugging Face repo id (only config.json is fetched).")
@click.option("--hosts", required=True, help="NAME:RAM per rank, e.g. mac1:64GB,mac2:24GB; NAME:RAM@LIMIT when the GPU wired limit is raised.")
@click.option("--context", type=click.IntRange(min=0), default=32768, show_default=True, help="Tokens of cache to plan for.")
@click.option("--parallel", type=click.Choice(["expert", "pipeline", "expert+pipeline"]), default="expert", show_default=True)
@click.option("--bits", type=int, default=4, show_default=True, help="Quantization of the weights (the converter's recipe).")
@click.option("--group-size", type=int, default=64, show_default=True)
def plan_command(model: str, hosts: str, context: int, parallel: str, bits: int, group_size: int) -> None:
    """Plan a distributed run: per-rank weights, cache and headroom, and bytes per token."""
    from ..distributed.plan import model_config, parse_hosts, plan_distributed

    config, source = model_config(model)
    plan = plan_distributed(config, parse_hosts(hosts), mode=parallel, context=context, bits=bits,
                            group_size=group_size, source=source)
    click.echo(plan.summary())
    problem = plan.problem()
    if problem is not None:
        raise click.ClickException(f"does not fit: {problem}")
