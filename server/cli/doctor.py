"""`edgeserve doctor`: is this machine ready to serve (or benchmark)? A pass / warn / fail table or JSON.

Exit status: 0 nothing failed (warnings allowed; with --strict they count as failures), 1 a check failed,
2 bad arguments or an unreadable snapshot.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from server.cli.options import N_CTX_HELP, N_PARALLEL_HELP, option
from server.launch.registry import backend_choices
from server.launch.request import LaunchRequest
from server.ops.check import Check
from server.ops.doctor import DoctorReport, doctor
from server.ops.snapshot import HostSnapshot

STYLE = {"pass": "green", "warn": "yellow", "fail": "bold red", "skip": "dim"}

err = Console(stderr=True)


def _fail(message: str) -> typer.Exit:
    err.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code=2)


def read_snapshot(path: Path) -> HostSnapshot:
    """A snapshot saved with --save-snapshot (here or on another machine), or exit 2 saying why not."""
    try:
        return HostSnapshot.model_validate_json(path.read_text())
    except (OSError, ValidationError, ValueError) as exc:
        raise _fail(f"cannot read snapshot {path}: {exc}") from None


def _row(check: Check) -> tuple[str, str, str, str]:
    status = f"[{STYLE[check.status]}]{check.status.upper()}[/]"
    gpu = "" if check.gpu is None else str(check.gpu)
    detail = check.detail + (f"\n[dim]-> {check.hint}[/]" if check.hint else "")
    return status, check.name, gpu, detail


def render(report: DoctorReport, console: Console) -> None:
    table = Table(title="edgeserve doctor", title_justify="left", show_lines=False)
    for col in ("status", "check", "GPU", "detail"):
        table.add_column(col, overflow="fold", no_wrap=col in ("status", "check"))
    for check in report.checks:
        table.add_row(*_row(check))
    console.print(table)
    tally = ", ".join(f"{n} {status}" for status, n in report.counts.items())
    verdict = "[bold red]not ready[/]" if report.exit_code else "[green]ready[/]"
    console.print(f"{tally}: {verdict}" + (" (CPU only)" if report.is_cpu_only else ""), highlight=False)


def register(app: typer.Typer) -> None:
    @app.command("doctor")
    def doctor_command(
        as_json: Annotated[bool, typer.Option("--json", help="print the report as JSON")] = False,
        strict: Annotated[bool, typer.Option("--strict", help="warnings fail too (exit 1)")] = False,
        model_path: Annotated[
            Path | None, option("model_path", "model the plan is made for (default: the bundled one)")
        ] = None,
        card: Annotated[str, typer.Option(help="card id, 'cpu', or auto (detect)")] = "auto",
        backend: Annotated[
            str, typer.Option(help=f"backend to plan for: {', '.join(backend_choices())}")
        ] = "auto",
        n_ctx: Annotated[int | None, option("n_ctx", N_CTX_HELP)] = None,
        n_parallel: Annotated[int | None, option("n_parallel", N_PARALLEL_HELP)] = None,
        host: Annotated[str, typer.Option(help="address the gateway will listen on")] = "127.0.0.1",
        port: Annotated[int, typer.Option(min=1, max=65535, help="the gateway's port")] = 8000,
        models_dir: Annotated[
            Path | None, typer.Option(help="where models go (disk check; default: the model's folder or .)")
        ] = None,
        snapshot: Annotated[
            Path | None, typer.Option(help="judge this saved snapshot instead of looking at this machine")
        ] = None,
        save_snapshot: Annotated[
            Path | None, typer.Option(help="also write what was seen, as JSON (replay it with --snapshot)")
        ] = None,
    ) -> None:
        """Check GPUs (NVML), the llama.cpp build, SGLang, NCCL, RAM, disk and ports before serving."""
        if backend not in backend_choices():
            raise _fail(f"unknown backend {backend!r}; supported: {', '.join(backend_choices())}")
        if snapshot is not None:
            seen = read_snapshot(snapshot)
        else:
            from server.ops.probe import take_snapshot

            try:
                request = LaunchRequest(
                    backend=backend, card=card, host=host, n_ctx=n_ctx, n_parallel=n_parallel,
                    model_path=str(model_path) if model_path else None,
                )
            except ValidationError as exc:
                raise _fail(str(exc.errors()[0]["msg"])) from None
            seen = take_snapshot(request, gateway_port=port, models_dir=models_dir)
        if save_snapshot is not None:
            save_snapshot.write_text(seen.model_dump_json(indent=2) + "\n")
        report = doctor(seen, strict=strict)
        if as_json:
            typer.echo(json.dumps(report.model_dump(mode="json"), indent=2))
        else:
            render(report, Console())
        raise typer.Exit(code=report.exit_code)
