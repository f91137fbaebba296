"""``python -m mlx_qwenmoe``: the ``mlx_qwenmoe`` command."""

from .cli import main

main(prog_name="mlx_qwenmoe")
