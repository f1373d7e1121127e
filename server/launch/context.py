"""BuildContext: the inputs every arg builder takes, and the reason log builders fill in."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from quantize.model.spec import ModelSpec
from server.hardware.cards import Card, GpuSet
from server.hardware.target import Target
from server.launch.plan import QuantFile, Reason, Scalar, Source
from server.launch.profile import ResolvedProfile
from server.launch.request import LaunchRequest
from server.launch.toolchain import Toolchain
from server.llama.offload import is_full_offload


@dataclass(frozen=True)
class BuildContext:
    """Target (GPUs or the CPU), model, profile, the user's flags and the installed programs; plain values."""

    target: Target
    spec: ModelSpec
    model_path: str
    profile: ResolvedProfile
    request: LaunchRequest
    toolchain: Toolchain
    alternatives: tuple[QuantFile, ...] = ()
    model_bytes: int | None = None

    @property
    def gpu_set(self) -> GpuSet | None:
        """The GPUs, or None on the CPU."""
        return self.target if isinstance(self.target, GpuSet) else None

    @property
    def card(self) -> Card | None:
        return self.target.card if isinstance(self.target, GpuSet) else None

    @property
    def card_id(self) -> str:
        return self.target.card_id

    @property
    def gpus(self) -> int:
        return self.target.count

    def all_on_gpu(self, n_gpu_layers: int) -> bool:
        """Whether `n_gpu_layers` puts every layer, the output layer included, on this target's GPUs (before
        a LaunchPlan exists: the plan's own is_full_offload asks the same rule)."""
        return bool(self.gpus) and is_full_offload(n_gpu_layers, self.spec.n_layer)

    def setting(self, name: str) -> tuple[Any, Source]:
        """A profile value and where it came from (cli / env / profile / default)."""
        return self.profile.value(name), self.profile.source(name)

    def is_pinned(self, name: str) -> bool:
        """Whether the user fixed the setting (CLI flag or EDGESERVE_* variable): never derived away."""
        return self.profile.source(name) in ("cli", "env")


@dataclass
class ReasonLog:
    """Collects one Reason per decision, in the order the builder made them."""

    items: list[Reason] = field(default_factory=list)

    def add(self, setting: str, value: Scalar, source: Source, why: str) -> None:
        self.items.append(Reason(setting=setting, value=value, source=source, why=why))

    def freeze(self) -> tuple[Reason, ...]:
        return tuple(self.items)
