"""Several boxes, each serving the whole model, behind one router: the cluster file -> what runs where.

Each box is planned by the calculator for its own card (server.launch.planner, as `edgeserve launch` plans
it), then started on the box by `edgeserve launch` with those inputs: the box re-plans the same way and its
supervisor restarts the backend and steps down on OOM. The box's edgeserve gateway is the router's worker:
with the embedded engine the launched `edgeserve serve` is that gateway; with llama-server or SGLang the
backend listens on the box's loopback and `edgeserve serve --backend openai` in front of it is the worker.
Every gateway serves one model id (`model_name`), the id the router groups its workers by. SGLang's model
gateway (server.launch.router) runs in front with every box's gateway URL.

For one model too big for any box, server.launch.cluster splits it over several (SGLang multi-node tensor
parallel, llama.cpp RPC) instead.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from quantize.bundled import BundledModelMissingError, resolve_model_path
from server.launch.cluster import NodeCommand, load_cluster_file
from server.launch.embedded import option_args
from server.launch.plan import FlashAttn, LaunchPlan
from server.launch.request import LaunchRequest
from server.launch.resolve import PlanError
from server.launch.router import RouterPlan, RouterSettings, router_plan

GATEWAY_PORT = 8000
BACKEND_PORT = 8080
LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})


class BoxSettings(BaseModel):
    """`edgeserve launch` settings a box may set (the same names as its options and the profile's keys)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model_path: str | None = None
    n_ctx: int | None = Field(default=None, gt=0)
    n_parallel: int | None = Field(default=None, ge=1)
    kv_type: str | None = None
    flash_attn: FlashAttn | None = None
    kv_unified: bool | None = None
    n_batch: int | None = Field(default=None, ge=1)
    n_ubatch: int | None = Field(default=None, ge=1)
    n_threads: int | None = Field(default=None, ge=1)
    n_gpu_layers: int | None = Field(default=None, ge=0)
    mem_fraction: float | None = Field(default=None, gt=0, le=1)


class Box(BoxSettings):
    """One machine: where the router reaches it, its card, and its own settings (they win over `settings`)."""

    host: str = Field(min_length=1, description="address the router reaches this box at")
    card: str = Field(default="cpu", description="card id of the card table, or cpu")
    gpus: int | None = Field(default=None, ge=0)
    backend: str = "auto"
    port: int = Field(default=GATEWAY_PORT, ge=1, le=65535, description="the box's gateway (the worker)")
    backend_port: int = Field(default=BACKEND_PORT, ge=1, le=65535, description="llama-server / SGLang")
    listen: str | None = Field(default=None, description="gateway bind address (default: loopback boxes "
                               "listen on 127.0.0.1, others on 0.0.0.0)")
    ssh: str | None = Field(default=None, description="`cluster up --ssh` destination (default: host)")

    @property
    def is_local(self) -> bool:
        return self.host in LOOPBACK

    @property
    def bind(self) -> str:
        return self.listen or ("127.0.0.1" if self.is_local else "0.0.0.0")

    @property
    def worker_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


class ReplicaCluster(BaseModel):
    """The cluster file (server/launch/replicas.example.yaml; `model` is read as `model_path`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model_path: str | None = None
    model_name: str | None = Field(default=None, description="the id every box serves (default: file stem)")
    settings: BoxSettings = Field(default_factory=BoxSettings, description="every box's settings")
    router: RouterSettings = Field(default_factory=RouterSettings)
    boxes: tuple[Box, ...] = Field(min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _model_alias(cls, data: Any) -> Any:
        if isinstance(data, dict) and "model" in data:
            data = {("model_path" if k == "model" else k): v for k, v in data.items()}
        return data

    @model_validator(mode="after")
    def _check(self) -> ReplicaCluster:
        urls = [b.worker_url for b in self.boxes]
        if len(set(urls)) != len(urls):
            raise ValueError(f"two boxes share a gateway address: {urls}")
        for b in self.boxes:
            if b.port == b.backend_port:
                raise ValueError(f"box {b.host}: port and backend_port are both {b.port}")
        return self


class BoxPlan(BaseModel):
    """One box: the calculator's plan for it and the commands that start it, in order."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str
    worker_url: str
    is_local: bool
    ssh: str
    plan: LaunchPlan
    commands: tuple[NodeCommand, ...]


class ClusterPlan(BaseModel):
    """What runs where: every box, then the router in front of them."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model_name: str
    boxes: tuple[BoxPlan, ...]
    router: RouterPlan


def load_replica_cluster(path: Path) -> ReplicaCluster:
    return load_cluster_file(path, ReplicaCluster)


PlanMaker = Callable[[LaunchRequest], LaunchPlan]


def _settings(cluster: ReplicaCluster, box: Box) -> dict[str, Any]:
    """The box's launch settings: its own, else the cluster's `settings` (only those given)."""
    shared = cluster.settings.model_dump(exclude_none=True)
    own = box.model_dump(include=set(BoxSettings.model_fields), exclude_none=True)
    model_path = own.get("model_path") or shared.get("model_path") or cluster.model_path
    return shared | own | {"model_path": model_path}


def _launch_argv(edgeserve: tuple[str, ...], plan: LaunchPlan, box: Box,
                 settings: dict[str, Any]) -> tuple[str, ...]:
    """`edgeserve launch` with the inputs the plan was made from: the box plans the same way."""
    args = [*edgeserve, "launch", "--backend", plan.backend, "--card", box.card,
            "--host", plan.host, "--port", str(plan.port), "--model-name", str(plan.model_name)]
    if settings.get("model_path"):  # none: the box's own bundled model
        args += ["--model-path", settings["model_path"]]
    if box.gpus is not None:
        args += ["--gpus", str(box.gpus)]
    for name, value in settings.items():
        if name != "model_path":
            args += option_args(name, value)
    return tuple(args)


def _box_commands(edgeserve: tuple[str, ...], plan: LaunchPlan, box: Box, settings: dict[str, Any],
                  rank: int) -> tuple[NodeCommand, ...]:
    launch = _launch_argv(edgeserve, plan, box, settings)
    if plan.backend == "embedded":
        return (NodeCommand(rank=rank, host=box.host, role="edgeserve gateway, embedded engine (worker)",
                            argv=launch),)
    gateway = (*edgeserve, "serve", "--backend", "openai", "--upstream-url", f"http://{plan.host}:{plan.port}",
               "--host", box.bind, "--port", str(box.port), "--model-name", str(plan.model_name),
               "--n-parallel", str(plan.n_parallel), "--n-ctx", str(plan.n_ctx))
    return (NodeCommand(rank=rank, host=box.host, role=f"{plan.backend} (box loopback)", argv=launch),
            NodeCommand(rank=rank, host=box.host, role=f"edgeserve gateway over {plan.backend} (worker)",
                        argv=gateway))


def plan_replica_cluster(cluster: ReplicaCluster, make_plan: PlanMaker, *, edgeserve: tuple[str, ...],
                         python: str) -> ClusterPlan:
    """Plan every box with the calculator, then the router over their gateways (pure given `make_plan`).

    `edgeserve` is the command prefix on boxes on this machine; remote boxes run `edgeserve` from PATH."""
    first = _settings(cluster, cluster.boxes[0])["model_path"]
    try:
        model_name = cluster.model_name or resolve_model_path(first).stem
    except BundledModelMissingError as exc:
        raise PlanError(str(exc)) from None
    boxes = []
    for rank, box in enumerate(cluster.boxes):
        settings = _settings(cluster, box)

        def plan_at(host: str, port: int, backend: str, box: Box = box,
                    settings: dict[str, Any] = settings) -> LaunchPlan:
            request = LaunchRequest(backend=backend, card=box.card, gpus=box.gpus, host=host, port=port,
                                    model_name=model_name, **settings)
            try:
                return make_plan(request)
            except ValueError as exc:
                raise PlanError(f"box {box.host} ({box.card}): {exc}") from None

        plan = plan_at(box.bind, box.port, box.backend)
        if plan.backend != "embedded":  # the backend listens on the box's loopback, its gateway in front
            plan = plan_at("127.0.0.1", box.backend_port, plan.backend)
        commands = _box_commands(edgeserve if box.is_local else ("edgeserve",), plan, box, settings, rank)
        boxes.append(BoxPlan(host=box.host, worker_url=box.worker_url, is_local=box.is_local,
                             ssh=box.ssh or box.host, plan=plan, commands=commands))
    router = router_plan(cluster.router, tuple(b.plan for b in boxes), tuple(b.worker_url for b in boxes),
                         python)
    return ClusterPlan(model_name=model_name, boxes=tuple(boxes), router=router)


def ssh_argv(destination: str, command: NodeCommand) -> tuple[str, ...]:
    """The command run on a remote box over ssh. `-tt` gives it a terminal, so it ends when ssh does."""
    return ("ssh", "-o", "BatchMode=yes", "-tt", destination, command.command_line)
