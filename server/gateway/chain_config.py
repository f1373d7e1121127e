"""The fallback chain as configuration: backends in the order they are tried, each with its own limits.

A YAML file (see configs/gateway.example.yaml) read through pydantic-settings; EDGESERVE_CHAIN_* environment
variables override its top-level fields. Example:

    model_name: smollm2
    backends:
      - name: gpu
        kind: openai
        url: http://127.0.0.1:8080
        n_ctx: 8192
        slots: 16
      - name: cpu
        kind: embedded
        n_ctx: 2048
        slots: 4
        n_gpu_layers: 0
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from server.gateway.backends.base import Backend
from server.gateway.breaker import BreakerSettings

MemberKind = Literal["embedded", "openai"]


class ChainConfigError(ValueError):
    """The chain file is missing or does not describe a usable chain (the message names the file)."""


class MemberConfig(BaseModel):
    """One backend of the chain."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    kind: MemberKind
    # openai: a remote llama-server / SGLang / edgeserve.
    url: str | None = Field(default=None, description="base URL of the OpenAI-compatible server")
    model: str | None = Field(default=None, description="model name sent upstream (default: reported)")
    api_key: str | None = Field(default=None, description="key the gateway sends upstream")
    # embedded: the in-process engine.
    model_path: Path | None = Field(default=None, description="GGUF (default: bundled) (default: bundled)")
    n_gpu_layers: int = Field(default=-1, ge=-1, description="-1: every layer on the GPU when there is one")
    # both
    n_ctx: int | None = Field(default=None, ge=16, description="context per sequence, tokens")
    slots: int = Field(default=4, ge=1, le=1024, description="requests this backend runs at once")
    queue_size: int = Field(default=16, ge=0, description="requests waiting for one of its slots")
    queue_timeout_s: float = Field(default=30.0, gt=0, description="longest wait for a slot (then 408)")
    stall_timeout_s: float = Field(default=60.0, gt=0,
                                   description="no output for this long counts as a failure (then fall over)")
    connect_timeout_s: float = Field(default=5.0, gt=0)
    health_url: str | None = Field(default=None, description="openai: URL or path polled (default: /health)")
    health_interval_s: float = Field(default=2.0, gt=0)
    breaker: BreakerSettings = Field(default_factory=BreakerSettings)
    supervisor_status: Path | None = Field(
        default=None, description="status file of the supervisor running it (ladder steps -> metrics)")

    @model_validator(mode="after")
    def _check_kind(self) -> MemberConfig:
        if self.kind == "openai" and not self.url:
            raise ValueError(f"backend {self.name!r}: kind 'openai' needs url")
        if self.kind == "embedded" and self.url:
            raise ValueError(f"backend {self.name!r}: kind 'embedded' takes model_path, not url")
        return self

    @property
    def capacity(self) -> int:
        """Requests it can hold: running plus queued."""
        return self.slots + self.queue_size


class ChainConfig(BaseSettings):
    """The whole chain. Build it with `load_chain(path)`."""

    model_config = SettingsConfigDict(env_prefix="EDGESERVE_CHAIN_", frozen=True, extra="forbid")

    model_name: str | None = Field(default=None, description="model id clients see (default: the first's)")
    backends: list[MemberConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_names(self) -> ChainConfig:
        names = [b.name for b in self.backends]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"backend names must be unique: {', '.join(duplicates)}")
        return self

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings],
                                   init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource,
                                   dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource,
                                   ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Arguments first, then the environment, then the YAML file given to load_chain().
        yaml_file = settings_cls.model_config.get("yaml_file")
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if yaml_file is not None:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=yaml_file))
        return tuple(sources)


def load_chain(path: Path | str, **overrides: Any) -> ChainConfig:
    """Read a chain file. Raises ChainConfigError with the file's name on a missing file or a bad field."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ChainConfigError(f"gateway chain config not found: {path}")

    class _FromFile(ChainConfig):
        model_config = SettingsConfigDict(yaml_file=path)

    try:
        loaded = _FromFile(**overrides)
    except ValueError as exc:  # pydantic's ValidationError and YAML errors are both ValueErrors
        raise ChainConfigError(f"{path}: {exc}") from exc
    return ChainConfig.model_validate(loaded.model_dump())


def build_member_backend(member: MemberConfig) -> Backend:
    """The backend object for one member (not started)."""
    if member.kind == "openai":
        from server.gateway.backends.openai_upstream import OpenAIUpstreamBackend

        assert member.url is not None
        upstream = OpenAIUpstreamBackend(
            member.url, api_key=member.api_key, slots=member.slots, n_ctx=member.n_ctx, model=member.model,
            connect_timeout_s=member.connect_timeout_s, health_interval_s=member.health_interval_s,
            health_url=member.health_url)
        upstream.name = member.name
        return upstream

    from server.engine.config import EngineConfig
    from server.gateway.backends.embedded import ALL_LAYERS, EmbeddedBackend

    model_path = member.model_path
    if model_path is None:
        from quantize.bundled import default_model_path

        model_path = default_model_path()
    kwargs: dict[str, Any] = {
        "n_parallel": member.slots,
        "n_gpu_layers": ALL_LAYERS if member.n_gpu_layers < 0 else member.n_gpu_layers,
    }
    if member.n_ctx is not None:
        kwargs["n_ctx"] = member.n_ctx
    embedded = EmbeddedBackend(EngineConfig(model_path=str(model_path), **kwargs), model_id=member.model)
    embedded.name = member.name
    return embedded
