"""LaunchPlan: everything needed to start one backend process, and why each setting has its value.

A plan is a plain frozen value (JSON-printable). Arg builders (server.launch.sglang, .llama_server,
.embedded) produce it from the card, the model, the budget and the profile; the supervisor runs it; the OOM
ladder (server.launch.ladder) turns a failed plan into the next one. `argv` is always rendered from the other
fields by the backend's renderer: a plan never says one thing in its fields and another on its command line.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, computed_field, model_validator

from server.engine.config import FlashAttn
from server.llama.offload import is_full_offload, offload_layers

Source = Literal["profile", "tuned", "cli", "env", "derived", "default"]
Scalar = str | int | float | bool | None

__all__ = [
    "FlashAttn", "LaunchPlan", "MemoryEstimate", "QuantFile", "Reason", "Scalar", "Source", "StepTaken",
]


class Reason(BaseModel):
    """Where one setting's value came from: the profile, the tuned profile, a CLI flag, an EDGESERVE_*
    variable, a rule, a default."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    setting: str
    value: Scalar
    source: Source
    why: str


class MemoryEstimate(BaseModel):
    """The budget's prediction for this plan, per GPU (or host memory on the CPU)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    weights_bytes: int = Field(ge=0)
    kv_bytes: int = Field(ge=0)
    compute_bytes: int = Field(ge=0)
    overhead_bytes: int = Field(ge=0)
    capacity_bytes: int | None = Field(default=None, ge=0, description="memory the plan may use per device")

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_bytes + self.compute_bytes + self.overhead_bytes

    @property
    def fits(self) -> bool | None:
        return None if self.capacity_bytes is None else self.total_bytes <= self.capacity_bytes


class QuantFile(BaseModel):
    """Another quantization of the same model next to the planned file (the ladder may fall back to it)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    path: str
    quant: str
    size_bytes: int = Field(ge=0)


class StepTaken(BaseModel):
    """One setting changed by one step of the OOM ladder (a step may change several: model and quant)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    step: int = Field(ge=1)
    rung: str
    setting: str
    old: Scalar
    new: Scalar
    why: str


class LaunchPlan(BaseModel):
    """One backend process: its command, environment, health endpoint and the settings behind them.

    Settings carry edgeserve's names, the same as the profile's keys and the engine's fields. `n_ctx` is the
    context of ONE sequence; `n_ctx_total` = n_ctx * n_parallel is the KV pool in tokens, derived, never an
    input (llama-server's `-c` is this total, split over `-np` slots; SGLang's `--max-total-tokens`). `card`
    is `cpu` and `gpus` 0 on the CPU. `n_gpu_layers` counts the output layer like llama.cpp (n_layer + 1 =
    everything on the GPU); None where the backend has no such knob.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    backend: str
    card: str
    gpus: int = Field(ge=0)
    model_path: str
    model_bytes: int | None = Field(default=None, ge=0, description="size of the model file")
    quant: str | None = None
    quant_alternatives: tuple[QuantFile, ...] = ()
    n_layer: int | None = Field(default=None, gt=0)

    program: tuple[str, ...] = Field(min_length=1, description="command prefix, e.g. ('llama-server',)")
    argv: tuple[str, ...] = ()
    env: Mapping[str, str] = Field(default_factory=dict)
    host: str = "127.0.0.1"
    port: int = Field(ge=1, le=65535)
    health_url: str = ""

    n_ctx: int = Field(gt=0)
    n_parallel: int = Field(ge=1)
    mem_fraction: float | None = Field(default=None, gt=0, le=1)
    kv_type: str
    n_gpu_layers: int | None = Field(default=None, ge=0)
    flash_attn: FlashAttn = "auto"
    n_batch: int | None = Field(default=None, ge=1)
    n_ubatch: int | None = Field(default=None, ge=1)
    chunked_prefill_size: int | None = None
    kv_unified: bool = False
    n_threads: int | None = Field(default=None, ge=1)
    tp_size: int = Field(default=1, ge=1)
    dp_size: int = Field(default=1, ge=1)
    schedule_policy: str | None = None
    enable_metrics: bool = True
    backend_sampling: bool | None = None
    force: bool = False
    shutdown_grace_s: float = Field(default=30.0, ge=0)
    enforce_eager: bool = False
    prefix_cache: bool = True
    api_key: str | None = Field(default=None, repr=False)
    # the id clients and a router in front of several boxes name the model by (None: the backend's default)
    model_name: str | None = None

    nnodes: int = Field(default=1, ge=1)
    node_rank: int = Field(default=0, ge=0)
    dist_init_addr: str | None = None
    rpc_servers: tuple[str, ...] = ()

    memory: MemoryEstimate | None = None
    expected_total_bytes: int | None = Field(default=None, ge=0)
    reasons: tuple[Reason, ...] = ()
    ladder: tuple[StepTaken, ...] = ()

    @computed_field  # type: ignore[prop-decorator]
    @property
    def n_ctx_total(self) -> int:
        """The KV pool in tokens: n_ctx * n_parallel (derived, so it cannot disagree with them)."""
        return self.n_ctx * self.n_parallel

    @model_validator(mode="before")
    @classmethod
    def _drop_derived(cls, data: Any) -> Any:
        # A plan read back from its JSON carries n_ctx_total; it is checked, never taken as an input.
        if isinstance(data, dict) and "n_ctx_total" in data:
            data = dict(data)
            total = data.pop("n_ctx_total")
            if total != data.get("n_ctx", 0) * data.get("n_parallel", 0):
                raise ValueError(f"n_ctx_total {total} is not n_ctx x n_parallel")
        return data

    @model_validator(mode="after")
    def _check(self) -> LaunchPlan:
        if self.node_rank >= self.nnodes:
            raise ValueError(f"node_rank {self.node_rank} out of range for {self.nnodes} nodes")
        if (
            self.n_layer is not None
            and self.n_gpu_layers is not None
            and self.n_gpu_layers > offload_layers(self.n_layer)
        ):
            raise ValueError(
                f"n_gpu_layers {self.n_gpu_layers} exceeds n_layer + 1 = {offload_layers(self.n_layer)}"
            )
        return self

    @property
    def is_cpu(self) -> bool:
        return self.gpus == 0 or self.n_gpu_layers == 0

    @property
    def is_full_offload(self) -> bool:
        """Every layer on the GPU, the output layer included (server.llama.offload's rule)."""
        return (
            self.n_layer is not None
            and self.n_gpu_layers is not None
            and is_full_offload(self.n_gpu_layers, self.n_layer)
        )

    def reason(self, setting: str) -> Reason | None:
        """The last reason recorded for `setting` (ladder steps append newer ones)."""
        found = [r for r in self.reasons if r.setting == setting]
        return found[-1] if found else None

    def command_line(self) -> str:
        """argv as one shell-quoted line, with the environment this plan adds in front."""
        import shlex

        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env.items())
        cmd = shlex.join(self.argv)
        return f"{env} {cmd}" if env else cmd

    def to_json_dict(self) -> dict[str, object]:
        """The plan as `--dry-run --json` prints it (expected_total_bytes included, memory broken down)."""
        data = self.model_dump(mode="json")
        data["command"] = self.command_line()
        return data
