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
from server.launch.front import behind_front, gateway_plan, needs_front
from server.launch.gate import plan_refusal
from server.launch.plan import LaunchPlan
from server.launch.planner import make_plan
from server.launch.registry import backend_choices
from server.launch.request import LaunchRequest
from server.launch.stack import Stack
from server.launch.supervisor import SupervisorConfig
from server.launch.toolchain import probe_toolchain

out = Console()
err = Console(stderr=True)
# Where clients reach edgeserve: the gateway's port (the embedded engine's, or the one in front of a backend).
DEFAULT_PORT = 8000
# The exit status of a plan refused for not fitting the free memory (2 is a usage error).
DOES_NOT_FIT_EXIT = 3

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


def _does_not_fit(plan: LaunchPlan, request: LaunchRequest) -> str | None:
    """The refusal of a plan for this machine that does not fit its free memory now (None: it fits, or the
    plan is for another machine, or nothing can be read)."""
    if request.card not in ("auto", "cpu"):
        return None  # --card names a card this machine need not have: nothing here to measure
    from server.hardware.available import available_ram, available_vram

    if plan.gpus == 0:
        ram = available_ram()
        free = [(ram.device, ram.free_bytes)] if ram else []
    else:
        free = [(a.device, a.free_bytes) for a in available_vram()[: plan.gpus]]
    if not free:
        return None

    def replan(n_ctx: int, n_parallel: int) -> LaunchPlan:
        return make_plan(request.model_copy(update={"n_ctx": n_ctx, "n_parallel": n_parallel}))

    return plan_refusal(plan, free, replan)


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
    backend_sampling: Annotated[
        bool | None,
        option("backend_sampling", "llama.cpp: sampling inside the decode graph (default: where measured "
               "faster)", is_bool=True),
    ] = None,
    n_batch: Annotated[int | None, option("n_batch", "llama.cpp -b / SGLang prefill chunk")] = None,
    n_ubatch: Annotated[int | None, option("n_ubatch", "llama.cpp physical batch -ub")] = None,
    n_threads: Annotated[int | None, option("n_threads", "CPU threads for layers on the CPU")] = None,
    mem_fraction: Annotated[float | None, option("mem_fraction", "SGLang --mem-fraction-static")] = None,
    n_gpu_layers: Annotated[
        int | None, option("n_gpu_layers", "llama.cpp layers on the GPU, -1 = all")
    ] = None,
    host: Annotated[str, typer.Option(help="address clients connect to (the gateway's)")] = "127.0.0.1",
    port: Annotated[
        int | None,
        typer.Option(min=1, max=65535,
                     help="port for clients (default 8000; with --no-gateway the backend's usual one)"),
    ] = None,
    api_key: Annotated[str | None, typer.Option(help="require this API key")] = None,
    gateway: Annotated[
        bool, typer.Option(help="edgeserve's gateway in front of llama-server / SGLang on --port")
    ] = True,
    backend_port: Annotated[
        int | None,
        typer.Option(min=1, max=65535, help="backend port behind the gateway (8080, SGLang 30000)"),
    ] = None,
    shutdown_grace_s: Annotated[
        float | None, typer.Option(min=0, help="on SIGTERM, seconds for requests in flight (default 30)")
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="start even where the plan does not fit the memory free now")
    ] = False,
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
            backend_sampling=backend_sampling,
            n_batch=n_batch,
            n_ubatch=n_ubatch,
            n_threads=n_threads,
            mem_fraction=mem_fraction,
            n_gpu_layers=n_gpu_layers,
            host=host,
            port=port,
            api_key=api_key,
            gateway=gateway,
            backend_port=backend_port,
            shutdown_grace_s=shutdown_grace_s,
            force=force,
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
    refused = None if force else _does_not_fit(plan, request)
    front = None
    if request.gateway and needs_front(plan):
        plan = behind_front(plan, request.backend_port)
        front = gateway_plan(plan, program=probe_toolchain().edgeserve, host=host, port=port or DEFAULT_PORT,
                             api_key=api_key)

    if dry_run:
        if as_json:
            _echo_json(plan.to_json_dict() | ({"gateway": front.to_json_dict()} if front else {})
                       | ({"refused": refused} if refused else {}))
        else:
            show_plan(plan)
            if front is not None:
                show_plan(front)
        if refused:
            err.print(f"[red]error:[/red] {refused}", highlight=False, soft_wrap=True, markup=True)
            raise typer.Exit(code=DOES_NOT_FIT_EXIT)
        return
    if refused:
        err.print(f"[red]error:[/red] {refused}", highlight=False, soft_wrap=True, markup=True)
        raise typer.Exit(code=DOES_NOT_FIT_EXIT)

    _check_runnable(plan)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not every health poll
    if not as_json:
        show_plan(plan)
    config = SupervisorConfig(use_ladder=not no_ladder, available_bytes=_available_bytes(plan))
    stack = Stack(plan, front, config, status_path=status_file)
    code = stack.run()
    if as_json:
        _echo_json(stack.status())
    if code:
        raise typer.Exit(code=code)


def register(app: typer.Typer) -> None:
    app.command("launch")(launch)
