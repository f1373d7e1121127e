"""`edgeserve launch`: plan a backend for this card (or the one named) and run it under the supervisor."""

from __future__ import annotations

import json
import logging
import shutil
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from quantize.model.units import MIB
from server.cli.options import FLASH_ATTN_HELP, KV_TYPE_HELP, N_CTX_HELP, N_PARALLEL_HELP, option
from server.launch.cluster import cluster_commands, load_cluster
from server.launch.plan import LaunchPlan
from server.launch.planner import make_plan
from server.launch.registry import backend_choices
from server.launch.request import LaunchRequest
from server.launch.supervisor import Supervisor, SupervisorConfig

out = Console()
err = Console(stderr=True)

# The choices come from the backend registry: a new backend shows up here by registering.
BackendOption = Enum("BackendOption", {n.replace("-", "_"): n for n in backend_choices()}, type=str)  # type: ignore[misc]


def _fail(message: str) -> typer.Exit:
    err.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True, markup=True)
    return typer.Exit(code=2)


def _echo_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2))


def show_plan(plan: LaunchPlan) -> None:
    out.print(
        f"[bold]{plan.backend}[/bold] on [bold]{plan.card}[/bold]"
        f"{f' x{plan.gpus}' if plan.gpus > 1 else ''}: {plan.model_path}",
        highlight=False,
    )
    if plan.expected_total_bytes is not None:
        per = "per GPU" if plan.gpus else "in RAM"
        out.print(f"expected memory: {plan.expected_total_bytes / MIB:,.0f} MiB {per}", highlight=False)
    table = Table(title="settings", title_justify="left")
    for col in ("setting", "value", "source", "why"):
        table.add_column(col)
    for r in plan.reasons:
        table.add_row(r.setting, str(r.value), r.source, r.why)
    out.print(table)
    out.print("[bold]command[/bold]")
    out.print(plan.command_line(), highlight=False, soft_wrap=True, markup=False)


def _check_runnable(plan: LaunchPlan) -> None:
    program = plan.program[0]
    if shutil.which(program) is None and not Path(program).is_file():
        raise _fail(f"{program} not found: install it or pick another --backend")
    if plan.backend == "sglang":
        import importlib.util

        if importlib.util.find_spec("sglang") is None:
            raise _fail(
                "sglang is not installed in this Python: pip install sglang, or use --backend llama-server"
            )


def _available_bytes(plan: LaunchPlan) -> int | None:
    """Memory free for the backend right now (the OOM ladder sizes its first step with it)."""
    from server.hardware.detect import detect, detect_cpu

    if plan.gpus == 0:
        return detect_cpu().available_ram_bytes
    gpus = detect().gpus[: plan.gpus]
    return min(g.memory_free_bytes for g in gpus) if gpus else None


def launch(
    backend: Annotated[
        BackendOption, typer.Option(help="backend, or auto: SGLang where it runs, else llama.cpp")
    ] = BackendOption("auto"),  # type: ignore[assignment]
    card: Annotated[str, typer.Option(help="card id, 'cpu', or auto (detect)")] = "auto",
    gpus: Annotated[
        int | None, typer.Option(min=0, help="GPUs to use (default: all like GPU 0; 0 = CPU)")
    ] = None,
    model_path: Annotated[
        Path | None, option("model_path", "GGUF file or HF model dir (default: bundled SmolLM2)")
    ] = None,
    n_ctx: Annotated[int | None, option("n_ctx", N_CTX_HELP + " (default: the profile's)")] = None,
    n_parallel: Annotated[int | None, option("n_parallel", N_PARALLEL_HELP)] = None,
    kv_type: Annotated[str | None, option("kv_type", KV_TYPE_HELP)] = None,
    flash_attn: Annotated[Literal["on", "off", "auto"] | None, option("flash_attn", FLASH_ATTN_HELP)] = None,
    kv_unified: Annotated[
        bool | None, option("kv_unified", "llama.cpp: one KV pool shared by the sequences", is_bool=True)
    ] = None,
    n_batch: Annotated[int | None, option("n_batch", "llama.cpp -b / SGLang prefill chunk")] = None,
    n_ubatch: Annotated[int | None, option("n_ubatch", "llama.cpp physical batch -ub")] = None,
    n_threads: Annotated[int | None, option("n_threads", "CPU threads for layers on the CPU")] = None,
    mem_fraction: Annotated[float | None, option("mem_fraction", "SGLang --mem-fraction-static")] = None,
    n_gpu_layers: Annotated[
        int | None, option("n_gpu_layers", "llama.cpp layers on the GPU, -1 = all")
    ] = None,
    host: Annotated[str, typer.Option(help="address the backend listens on")] = "127.0.0.1",
    port: Annotated[
        int | None, typer.Option(min=1, max=65535, help="backend port (default: its usual one)")
    ] = None,
    api_key: Annotated[str | None, typer.Option(help="require this API key")] = None,
    model_name: Annotated[
        str | None, typer.Option(help="model id served at /v1/models (default: the backend's, the file name)")
    ] = None,
    cluster: Annotated[Path | None, typer.Option(help="cluster YAML: one command per node")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print the plan, start nothing")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    status_file: Annotated[
        Path | None, typer.Option(help="supervisor status JSON, rewritten on every change")
    ] = None,
    no_ladder: Annotated[
        bool, typer.Option("--no-ladder", help="do not step down after an OOM at start-up")
    ] = False,
) -> None:
    """Plan the backend for the card and model, and run it (restart on crash, step down on OOM)."""
    try:
        request = LaunchRequest(
            backend=backend.value,
            card=card,
            gpus=gpus,
            model_path=str(model_path) if model_path else None,
            n_ctx=n_ctx,
            n_parallel=n_parallel,
            kv_type=kv_type,
            flash_attn=flash_attn,
            kv_unified=kv_unified,
            n_batch=n_batch,
            n_ubatch=n_ubatch,
            n_threads=n_threads,
            mem_fraction=mem_fraction,
            n_gpu_layers=n_gpu_layers,
            host=host,
            port=port,
            api_key=api_key,
            model_name=model_name,
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        raise _fail(f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}") from None

    if cluster is not None:
        if not dry_run:
            raise _fail(
                "a cluster runs one command per node: print them with --dry-run and start each on its node"
            )
        try:
            commands = cluster_commands(load_cluster(cluster), request, make_plan)
        except ValueError as exc:
            raise _fail(str(exc)) from None
        if as_json:
            _echo_json({"nodes": [c.model_dump() | {"command": c.command_line} for c in commands]})
        else:
            for c in commands:
                out.print(f"[bold]node {c.rank}[/bold] {c.host} ({c.role})", highlight=False)
                out.print(c.command_line, highlight=False, soft_wrap=True, markup=False)
        return

    try:
        plan = make_plan(request)
    except ValueError as exc:
        raise _fail(str(exc)) from None

    if dry_run:
        if as_json:
            _echo_json(plan.to_json_dict())
        else:
            show_plan(plan)
        return

    _check_runnable(plan)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not every health poll
    if not as_json:
        show_plan(plan)
    config = SupervisorConfig(use_ladder=not no_ladder, available_bytes=_available_bytes(plan))
    supervisor = Supervisor(plan, config, status_path=status_file)
    code = supervisor.run()
    if as_json:
        _echo_json(supervisor.status())
    if code:
        raise typer.Exit(code=code)


def register(app: typer.Typer) -> None:
    app.command("launch")(launch)
