"""The `edgeserve` command line: one typer app, one module per command group."""

from __future__ import annotations

import typer

from loadtest import tuner as tune_cmd
from server.cli import bundle as bundle_cmd
from server.cli import cluster as cluster_cmd
from server.cli import doctor as doctor_cmd
from server.cli import gpu as gpu_cmd
from server.cli import host_setup as host_setup_cmd
from server.cli import launch as launch_cmd
from server.cli import plan as plan_cmd
from server.cli import quantize as quantize_cmd
from server.cli import serve as serve_cmd

app = typer.Typer(
    name="edgeserve",
    help="LLM serving for small NVIDIA GPUs and the CPU.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

for module in (gpu_cmd, doctor_cmd, host_setup_cmd, plan_cmd, quantize_cmd, launch_cmd, cluster_cmd,
               serve_cmd, tune_cmd, bundle_cmd):
    module.register(app)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
