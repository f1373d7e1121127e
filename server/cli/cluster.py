"""`edgeserve cluster`: several boxes serving one model behind SGLang's model gateway (sglang-router).

`plan` prints what runs where (each box's plan from the calculator, its commands, the router's command and
why each router setting has its value); `up` starts it: the boxes on this machine, remote ones over ssh with
`--ssh`, then the router, and keeps them until Ctrl-C.
"""

from __future__ import annotations

import json
import logging
import signal
import tempfile
from pathlib import Path
from types import FrameType
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from server.cli.launch import show_plan
from server.launch.plan import Reason
from server.launch.planner import make_plan
from server.launch.replicas import ClusterPlan, load_replica_cluster, plan_replica_cluster, ssh_argv
from server.launch.toolchain import probe_toolchain

out = Console()
err = Console(stderr=True)

cluster_app = typer.Typer(help="Several boxes, one model, SGLang's model gateway in front (see "
                          "server/launch/replicas.example.yaml).", no_args_is_help=True)

ClusterFile = Annotated[Path, typer.Argument(help="cluster YAML (server/launch/replicas.example.yaml)")]


def _fail(message: str) -> typer.Exit:
    err.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code=2)


def build(path: Path) -> ClusterPlan:
    """The cluster file -> the plan, every box planned by the calculator on this machine's view."""
    toolchain = probe_toolchain()
    try:
        cluster = load_replica_cluster(path)
        return plan_replica_cluster(cluster, lambda r: make_plan(r, toolchain=toolchain),
                                    edgeserve=toolchain.edgeserve, python=toolchain.python)
    except ValueError as exc:
        raise _fail(str(exc)) from None


def _reasons(title: str, reasons: tuple[Reason, ...]) -> Table:
    table = Table(title=title, title_justify="left")
    for col in ("setting", "value", "source", "why"):
        table.add_column(col)
    for r in reasons:
        table.add_row(r.setting, str(r.value), r.source, r.why)
    return table


def _show(plan: ClusterPlan) -> None:
    out.print(f"[bold]model[/bold] {plan.model_name}: {len(plan.boxes)} boxes behind sglang-router",
              highlight=False)
    for rank, box in enumerate(plan.boxes):
        where = "this machine" if box.is_local else f"ssh {box.ssh}"
        out.print(f"\n[bold]box {rank}[/bold] {box.host} ({where}), worker {box.worker_url}", highlight=False)
        show_plan(box.plan)
        for command in box.commands:
            out.print(f"[bold]{command.role}[/bold]", highlight=False)
            out.print(command.command_line, highlight=False, soft_wrap=True, markup=False)
    out.print(f"\n[bold]router[/bold] {plan.router.url} (metrics {plan.router.metrics_url})", highlight=False)
    out.print(_reasons("router settings", plan.router.reasons))
    out.print(" ".join(plan.router.argv), highlight=False, soft_wrap=True, markup=False)


@cluster_app.command("plan")
def plan_cmd(
    cluster_file: ClusterFile,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Plan every box with the calculator and print what runs where; start nothing."""
    plan = build(cluster_file)
    if not as_json:
        _show(plan)
        return
    data = plan.model_dump(mode="json")
    for box, box_data in zip(plan.boxes, data["boxes"], strict=True):
        box_data["plan"] = box.plan.to_json_dict()
        for command, command_data in zip(box.commands, box_data["commands"], strict=True):
            command_data["command"] = (command.command_line if box.is_local
                                       else " ".join(ssh_argv(box.ssh, command)))
    data["router"]["url"] = plan.router.url
    data["router"]["metrics_url"] = plan.router.metrics_url
    typer.echo(json.dumps(data, indent=2))


@cluster_app.command("up")
def up_cmd(
    cluster_file: ClusterFile,
    ssh: Annotated[
        bool, typer.Option("--ssh", help="start remote boxes over ssh (BatchMode: keys only)")
    ] = False,
    log_dir: Annotated[
        Path | None, typer.Option(help="one log per process (default: a new temp dir)")
    ] = None,
    ready_timeout_s: Annotated[float, typer.Option(min=1, help="longest wait for a box or the router")] = 600,
) -> None:
    """Start the boxes (this machine's; remote ones with --ssh), then the router; Ctrl-C stops them all."""
    import importlib.util

    from server.launch.cluster_runner import ClusterRunner, ClusterStartError

    if importlib.util.find_spec("sglang_router") is None:
        raise _fail("sglang-router is not installed in this Python: pip install 'edgeserve[cluster]' "
                    "(sglang-router 0.3.2)")
    plan = build(cluster_file)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logs = log_dir or Path(tempfile.mkdtemp(prefix="edgeserve-cluster-"))
    runner = ClusterRunner(plan, log_dir=logs, use_ssh=ssh, ready_timeout_s=ready_timeout_s)

    def _stop(signum: int, _: FrameType | None) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, _stop)
    try:
        runner.start()
        out.print(f"cluster up: {plan.router.url}/v1 serves {plan.model_name} over {len(plan.boxes)} boxes; "
                  f"logs in {logs}", highlight=False)
        code = runner.wait()
    except ClusterStartError as exc:
        raise _fail(str(exc)) from None
    except KeyboardInterrupt:
        code = 0
    finally:
        runner.stop()
    if code:
        raise typer.Exit(code=code)


def register(app: typer.Typer) -> None:
    app.add_typer(cluster_app, name="cluster")
