"""`edgeserve host-setup`: the nvidia-smi commands that prepare this host's GPUs; `--apply` runs them (root).

Exit status: 0 done (or nothing to do), 1 an applied command failed, 2 a value refused or bad arguments,
3 no NVIDIA GPU, 4 --apply without root.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError
from rich.console import Console

from server.cli.doctor import read_snapshot
from server.hardware.gpu_info import GpuInfo
from server.ops.apply import ActionResult, apply_actions
from server.ops.host_setup import SETTABLE_COMPUTE_MODES, HostSetupPlan, HostSetupRequest, plan_host_setup

EXIT_APPLY_FAILED, EXIT_REFUSED, EXIT_NO_GPU, EXIT_NOT_ROOT = 1, 2, 3, 4

out = Console()
err = Console(stderr=True)


def _pair(value: str | None, what: str) -> tuple[int, int] | None:
    if value is None:
        return None
    parts = value.split(",")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise _exit(EXIT_REFUSED, f"{what} wants two whole numbers in MHz as A,B (got {value!r})")
    return int(parts[0]), int(parts[1])


def _power(value: str | None) -> int | str | None:
    if value is None or value in ("default", "max"):
        return value
    if not value.isdigit():
        raise _exit(EXIT_REFUSED, f"--power-limit wants whole watts, 'default' or 'max' (got {value!r})")
    return int(value)


def _exit(code: int, message: str) -> typer.Exit:
    err.print(f"[red]host-setup:[/red] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code=code)


def _gpus(snapshot: Path | None) -> tuple[GpuInfo, ...]:
    if snapshot is not None:
        det = read_snapshot(snapshot).detection
    else:
        from server.hardware.detect import detect

        det = detect()
    if det.is_cpu_only:
        raise _exit(EXIT_NO_GPU, f"no NVIDIA GPU here ({det.reason or 'none found'}): nothing to set up; "
                                 "edgeserve serves on the CPU")
    return det.gpus


def _show(plan: HostSetupPlan, results: tuple[ActionResult, ...] | None) -> None:
    for finding in plan.findings:
        where = "" if finding.gpu is None else f"GPU {finding.gpu} "
        style = "red" if finding.refused else "dim"
        word = "refused" if finding.refused else "unchanged"
        out.print(f"[{style}]{word}[/] {where}{finding.setting}: {finding.detail}", highlight=False)
    if results is None:
        for action in plan.actions:
            out.print(f"[dim]# GPU {action.gpu} {action.setting}: {action.why}[/]", highlight=False)
            out.print(action.command, highlight=False, markup=False)
        if plan.actions:
            out.print("[dim]run them with --apply (as root), or copy them[/]")
        return
    for result in results:
        mark = "[green]ok[/]" if result.ok else f"[red]failed (exit {result.returncode})[/]"
        out.print(f"{mark} {result.action.command}", highlight=False)
        if result.output:
            out.print(f"  {result.output}", highlight=False, markup=False)


def register(app: typer.Typer) -> None:
    @app.command("host-setup")
    def host_setup(
        apply: Annotated[bool, typer.Option("--apply", help="run the commands (needs root)")] = False,
        gpu: Annotated[
            list[int] | None, typer.Option(help="GPU index (repeat for several; default all)")
        ] = None,
        persistence: Annotated[
            bool, typer.Option("--persistence/--no-persistence", help="turn persistence mode on where off")
        ] = True,
        power_limit: Annotated[
            str | None, typer.Option(help="board power limit: watts, 'default' or 'max' (NVML's range)")
        ] = None,
        lock_clocks: Annotated[
            str | None, typer.Option(help="MIN,MAX SM clock in MHz (Volta+): repeatable benchmarks")
        ] = None,
        app_clocks: Annotated[
            str | None, typer.Option(help="MEMORY,GRAPHICS application clocks in MHz (cards that take them)")
        ] = None,
        reset_clocks: Annotated[
            bool, typer.Option("--reset-clocks", help="undo locked and application clocks")
        ] = False,
        compute_mode: Annotated[
            str | None, typer.Option(help=f"compute mode: {', '.join(SETTABLE_COMPUTE_MODES)}")
        ] = None,
        as_json: Annotated[bool, typer.Option("--json", help="print the plan (and results) as JSON")] = False,
        snapshot: Annotated[
            Path | None, typer.Option(help="plan for the GPUs of a saved doctor snapshot (prints only)")
        ] = None,
    ) -> None:
        """Persistence mode, power limit, clocks and compute mode per GPU, as exact nvidia-smi commands."""
        try:
            # Validated as data: pydantic checks the power target and the compute mode against their names.
            request = HostSetupRequest.model_validate({
                "gpus": tuple(gpu) if gpu else None,
                "persistence": persistence,
                "power_limit_w": _power(power_limit),
                "locked_clocks_mhz": _pair(lock_clocks, "--lock-clocks"),
                "applications_clocks_mhz": _pair(app_clocks, "--app-clocks"),
                "reset_clocks": reset_clocks,
                "compute_mode": compute_mode,
            })
        except ValidationError as exc:
            raise _exit(EXIT_REFUSED, "; ".join(str(e["msg"]) for e in exc.errors())) from None
        if apply and snapshot is not None:
            raise _exit(EXIT_REFUSED, "--snapshot plans for another machine's GPUs: it cannot be applied")
        if apply and os.geteuid() != 0:
            raise _exit(EXIT_NOT_ROOT, "--apply changes GPU settings and needs root (run without it to see "
                                       "the commands)")
        plan = plan_host_setup(_gpus(snapshot), request)
        refused = bool(plan.refusals)
        results = apply_actions(plan.actions) if apply and not refused else None
        if as_json:
            data = plan.model_dump(mode="json") | {
                "applied": None if results is None else [r.model_dump(mode="json") for r in results]}
            typer.echo(json.dumps(data, indent=2))
        else:
            _show(plan, results)
        if refused:
            raise _exit(EXIT_REFUSED, "nothing was changed: " + "; ".join(
                f"GPU {f.gpu} {f.detail}" if f.gpu is not None else f.detail for f in plan.refusals))
        if results is not None and not all(r.ok for r in results):
            raise typer.Exit(code=EXIT_APPLY_FAILED)
