"""The models file: every model one gateway serves, its settings and its residency policy (YAML).

Settings keep the names they have everywhere else (`n_ctx`, `n_parallel`, `kv_type`, ...): an embedded
model's settings are EngineConfig's fields, a llama-server model's are `edgeserve launch`'s. SGLang fills a
fixed share of the card whatever it serves, so it stays one model per server and is refused here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from server.engine.config import EngineConfig

ModelBackend = Literal["embedded", "llama-server"]
SGLANG_REFUSAL = ("SGLang takes a fixed share of the card's memory (--mem-fraction-static) whatever it "
                  "serves, so it stays one model per server: run it with `edgeserve launch --backend sglang` "
                  "and put it in a fallback chain instead")


class ModelPolicy(BaseModel):
    """When a model may leave memory."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    pinned: bool = Field(default=False, description="loaded at start and never evicted")
    idle_ttl_s: float | None = Field(
        default=None, gt=0, description="unloaded after this long without a request (None: only evicted)")
    priority: int = Field(default=0, description="evicted after every idle model of a lower priority")


class ModelEntry(BaseModel):
    """One model of the file."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1, description="the id /v1/models shows and responses carry")
    path: str | None = Field(default=None, description="GGUF file (None: the bundled model)")
    served_names: tuple[str, ...] = Field(default=(), description="more names requests may ask for")
    backend: ModelBackend = "embedded"
    settings: dict[str, Any] = Field(default_factory=dict, description="n_ctx, n_parallel, kv_type, ...")
    policy: ModelPolicy = Field(default_factory=ModelPolicy)

    @field_validator("backend", mode="before")
    @classmethod
    def _no_sglang(cls, value: object) -> object:
        if value == "sglang":
            raise ValueError(SGLANG_REFUSAL)
        return value

    @model_validator(mode="after")
    def _check_settings(self) -> ModelEntry:
        if self.backend == "embedded":
            self.engine_config()  # raises with the field's own message
        return self

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys((self.name, *self.served_names)))

    def engine_config(self) -> EngineConfig:
        """The embedded engine's settings for this model (the file's over EngineConfig's defaults)."""
        return EngineConfig(model_path=self.path, **self.settings)

    @property
    def n_parallel(self) -> int:
        return int(self.settings.get("n_parallel", EngineConfig.model_fields["n_parallel"].default))


class ModelsFile(BaseModel):
    """The whole file: the memory budget the models share and the models."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    budget_mib: int | None = Field(
        default=None, gt=0,
        description="memory the resident models may plan for together, MiB: one card's on a GPU, RAM on the "
        "CPU (None: the card's memory times gpu_memory_utilization 0.9, or 3/4 of the RAM available)")
    load_wait_s: float = Field(
        default=120.0, gt=0,
        description="longest a request waits for its model to load, or for busy models to finish, before 503")
    models: tuple[ModelEntry, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_names(self) -> ModelsFile:
        seen: dict[str, str] = {}
        for entry in self.models:
            for name in entry.names:
                if name in seen and seen[name] != entry.name:
                    raise ValueError(f"the name {name!r} is served by both {seen[name]!r} and {entry.name!r}")
                seen[name] = entry.name
        return self

    def entry_for(self, name: str) -> ModelEntry | None:
        """The model a request's `model` field names (its name or one of its served names)."""
        for entry in self.models:
            if name in entry.names:
                return entry
        return None

    @property
    def all_names(self) -> list[str]:
        return [n for entry in self.models for n in entry.names]


def load_models_file(path: Path) -> ModelsFile:
    """Read and check a models file; relative model paths are taken from the file's folder.
    Raises ValueError (pydantic's ValidationError is one) with what is wrong."""
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a models file is a mapping with a `models` list")
    for raw in data.get("models") or ():
        where = Path(str(raw.get("path") or "")).expanduser() if isinstance(raw, dict) else None
        if where is not None and raw.get("path") and not where.is_absolute():
            raw["path"] = str((path.parent / where).resolve())
    return ModelsFile.model_validate(data)
