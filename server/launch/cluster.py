"""Several machines, one model: a small cluster YAML -> one command per node.

- sglang: every node runs `sglang.launch_server` with the same model and `--tp-size` = all GPUs of all nodes,
  plus `--nnodes N --node-rank i --dist-init-addr <node 0's host:port>` (torch.distributed's rendezvous); node
  0 serves HTTP.
- llama-server: node 0 runs llama-server with `--rpc host:port,...` naming the other nodes, which each run
  llama.cpp's `ggml-rpc-server -H <its host> -p PORT` (both sides built with -DGGML_RPC=ON); llama.cpp then
  splits the layers over every local and remote device.
The per-GPU budget is the one of the whole set (tp over all GPUs; layers over all devices).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Literal, TypeVar

import yaml
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, model_validator

from server.launch.plan import LaunchPlan
from server.launch.registry import get_backend
from server.launch.request import LaunchRequest
from server.launch.resolve import PlanError
from server.llama.offload import offload_layers

ClusterBackend = Literal["sglang", "llama-server"]
DEFAULT_RPC_PORT = 50052


class ClusterNode(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str = Field(min_length=1)


class ClusterSpec(BaseModel):
    """The cluster YAML (see server/launch/cluster.example.yaml; `model` is read as `model_path`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    backend: ClusterBackend
    card: str
    gpus_per_node: int = Field(default=1, ge=0, description="0 with card cpu: llama.cpp RPC over CPUs")
    model_path: str | None = Field(default=None, validation_alias=AliasChoices("model_path", "model"))
    dist_init_addr: str | None = Field(default=None, description="sglang: host:port of node 0's rendezvous")
    rpc_port: int = Field(default=DEFAULT_RPC_PORT, ge=1, le=65535)
    nodes: tuple[ClusterNode, ...] = Field(min_length=2)

    @model_validator(mode="after")
    def _check(self) -> ClusterSpec:
        hosts = [n.host for n in self.nodes]
        if len(set(hosts)) != len(hosts):
            raise ValueError(f"node hosts repeat: {hosts}")
        if (self.card == "cpu") != (self.gpus_per_node == 0):
            raise ValueError("card cpu goes with gpus_per_node 0, a GPU card with 1 or more")
        if self.card == "cpu" and self.backend == "sglang":
            raise ValueError("SGLang needs GPUs: a CPU cluster runs llama-server with rpc-server nodes")
        return self

    @property
    def total_gpus(self) -> int:
        return self.gpus_per_node * len(self.nodes)

    @property
    def rendezvous(self) -> str:
        return self.dist_init_addr or f"{self.nodes[0].host}:50000"


class NodeCommand(BaseModel):
    """What one node runs."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    rank: int
    host: str
    role: str
    argv: tuple[str, ...]
    env: dict[str, str] = Field(default_factory=dict)

    @property
    def command_line(self) -> str:
        import shlex

        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env.items())
        return f"{env} {shlex.join(self.argv)}".strip()


SpecT = TypeVar("SpecT", bound=BaseModel)


def load_cluster_file(path: Path, spec: type[SpecT]) -> SpecT:
    """A cluster YAML validated as `spec`; PlanError naming the file and every problem in it."""
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise PlanError(f"{path}: cannot read cluster file ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise PlanError(f"{path}: not valid YAML ({exc})") from None
    try:
        return spec.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise PlanError(f"{path}: {problems}") from None


def load_cluster(path: Path) -> ClusterSpec:
    return load_cluster_file(path, ClusterSpec)


PlanMaker = Callable[[LaunchRequest], LaunchPlan]


def cluster_commands(
    spec: ClusterSpec, request: LaunchRequest, make_plan: PlanMaker
) -> tuple[NodeCommand, ...]:
    """One command per node. `make_plan` builds the plan for the whole GPU set (pure in tests)."""
    base = request.model_copy(
        update={
            "backend": spec.backend,
            "card": spec.card,
            "gpus": spec.total_gpus,
            "model_path": request.model_path or spec.model_path,
        }
    )
    plan = make_plan(base)
    backend = get_backend(plan.backend)
    if spec.backend == "sglang":
        out = []
        for rank, node in enumerate(spec.nodes):
            node_plan = plan.model_copy(
                update={
                    "gpus": spec.gpus_per_node,
                    "nnodes": len(spec.nodes),
                    "node_rank": rank,
                    "dist_init_addr": spec.rendezvous,
                }
            )
            node_plan = backend.finish(node_plan)
            out.append(
                NodeCommand(
                    rank=rank,
                    host=node.host,
                    role="sglang rank 0 (serves HTTP)" if rank == 0 else f"sglang rank {rank}",
                    argv=node_plan.argv,
                    env=dict(node_plan.env),
                )
            )
        return tuple(out)
    workers = spec.nodes[1:]
    head = plan.model_copy(
        update={
            "gpus": spec.gpus_per_node,
            "rpc_servers": tuple(f"{n.host}:{spec.rpc_port}" for n in workers),
            # The remote devices take layers only as offloaded ones: all of them, over every device.
            "n_gpu_layers": offload_layers(plan.n_layer) if plan.n_layer else plan.n_gpu_layers,
        }
    )
    head = backend.finish(head)
    cmds = [
        NodeCommand(
            rank=0,
            host=spec.nodes[0].host,
            role="llama-server (serves HTTP)",
            argv=head.argv,
            env=dict(head.env),
        )
    ]
    for rank, node in enumerate(workers, start=1):
        cmds.append(
            NodeCommand(
                rank=rank,
                host=node.host,
                role="llama.cpp rpc-server",
                # Bound to the node's own address, not every interface: rpc-server has no authentication.
                argv=("ggml-rpc-server", "-H", node.host, "-p", str(spec.rpc_port)),
                env={
                    "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
                    "CUDA_VISIBLE_DEVICES": ",".join(str(i) for i in range(spec.gpus_per_node)),
                },
            )
        )
    return tuple(cmds)
