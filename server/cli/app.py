"""The `edgeserve` command line: one typer app, one module per command group."""

from __future__ import annotations

import typer

from server.cli import gpu, launch, plan, quantize, serve

app = typer.Typer(
    name="edgeserve",
    help="LLM serving for small NVIDIA GPUs and the CPU.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

for module in (gpu, plan, quantize, launch, serve):
    module.register(app)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
