"""BuildContext: the inputs every arg builder takes, and the reason log builders fill in."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from quantize.model_spec import ModelSpec
from server.cards import Card, GpuSet
from server.launch.plan import CPU_CARD, QuantFile, Reason, Scalar, Source
from server.launch.profiles import ResolvedProfile
from server.launch.request import LaunchRequest
from server.launch.toolchain import Toolchain


@dataclass(frozen=True)
class BuildContext:
    """Card (None = CPU), model, profile, the user's flags and the installed programs; all plain values."""

    target: GpuSet | None
    spec: ModelSpec
    model_path: str
    profile: ResolvedProfile
    request: LaunchRequest
    toolchain: Toolchain
    alternatives: tuple[QuantFile, ...] = ()
    model_bytes: int | None = None
    host_ram_bytes: int | None = None

    @property
    def card(self) -> Card | None:
        return self.target.card if self.target is not None else None

    @property
    def card_id(self) -> str:
        return self.target.card.id if self.target is not None else CPU_CARD

    @property
    def gpus(self) -> int:
        return self.target.count if self.target is not None else 0

    def setting(self, name: str) -> tuple[Any, Source]:
        """A profile value and where it came from (cli / env / profile / default)."""
        return self.profile.value(name), self.profile.source(name)


@dataclass
class ReasonLog:
    """Collects one Reason per decision, in the order the builder made them."""

    items: list[Reason] = field(default_factory=list)

    def add(self, setting: str, value: Scalar, source: Source, why: str) -> None:
        self.items.append(Reason(setting=setting, value=value, source=source, why=why))

    def freeze(self) -> tuple[Reason, ...]:
        return tuple(self.items)
