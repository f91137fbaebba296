"""``python -m mlx_qwenmoe``: the command line."""

from .cli import main

main(prog_name="mlx_qwenmoe")
