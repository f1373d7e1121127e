"""The fallback chain as configuration: backends in the order they are tried, each with its own limits.

A YAML file (see server/gateway/chain.example.yaml) read through pydantic-settings; EDGESERVE_CHAIN_*
environment variables override its top-level fields. A member is an EngineConfig with a name and its limits:
the engine's settings keep the engine's names (n_ctx per sequence, n_parallel, kv_type, flash_attn,
kv_unified, n_threads, n_batch, ...), so an embedded member's engine is the member's config itself. Example:

    model_name: smollm2
    backends:
      - name: gpu
        kind: openai
        url: http://127.0.0.1:8080
        n_ctx: 8192          # the upstream's context per sequence, when it does not report one
        n_parallel: 16
      - name: cpu
        kind: embedded
        n_ctx: 2048
        n_parallel: 4
        n_gpu_layers: 0
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

from pydantic import ConfigDict, Field, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from server.engine.config import EngineConfig
from server.gateway.backends.base import Backend
from server.gateway.breaker import BreakerSettings

log = logging.getLogger(__name__)

MemberKind = Literal["embedded", "openai"]
# Keys of earlier versions, read under their new names with a deprecation warning.
DEPRECATED_KEYS = {"slots": "n_parallel"}


class ChainConfigError(ValueError):
    """The chain file is missing or does not describe a usable chain (the message names the file)."""


class MemberConfig(EngineConfig):
    """One backend of the chain: the engine's settings (for kind embedded; n_parallel and n_ctx also for
    openai) plus the member's name, kind and limits."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    kind: MemberKind
    # openai: a remote llama-server / SGLang / edgeserve.
    url: str | None = Field(default=None, description="base URL of the OpenAI-compatible server")
    model: str | None = Field(default=None, description="model name sent upstream (default: reported)")
    api_key: str | None = Field(default=None, description="key the gateway sends upstream")
    dialect: str = Field(default="auto", description="openai: the upstream's dialect (backends/dialects.py)")
    capabilities: list[str] | None = Field(
        default=None, description="openai: features the upstream supports, narrowing its dialect's "
        "(grammar, json_schema, tools, n, logit_bias, token_prompt, embeddings)")
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

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for old, new in DEPRECATED_KEYS.items():
                if old in data:
                    log.warning("chain backend %s: %r is deprecated, use %r", data.get("name"), old, new)
                    data = {k: v for k, v in data.items() if k != old} | {new: data.get(new, data[old])}
        return data

    @model_validator(mode="after")
    def _check_kind(self) -> MemberConfig:
        if self.kind == "openai" and not self.url:
            raise ValueError(f"backend {self.name!r}: kind 'openai' needs url")
        if self.kind == "embedded" and self.url:
            raise ValueError(f"backend {self.name!r}: kind 'embedded' takes model_path, not url")
        return self

    @model_validator(mode="after")
    def _check_features(self) -> MemberConfig:
        from server.gateway.backends.dialects import dialect
        from server.gateway.backends.features import ALL_FEATURES

        if self.dialect != "auto":
            dialect(self.dialect)
        unknown = sorted(set(self.capabilities or ()) - ALL_FEATURES)
        if unknown:
            raise ValueError(f"backend {self.name!r}: unknown capabilities {', '.join(unknown)}; "
                             f"supported: {', '.join(sorted(ALL_FEATURES))}")
        return self

    @property
    def capacity(self) -> int:
        """Requests it can hold: running plus queued."""
        return self.n_parallel + self.queue_size

    @property
    def n_ctx_given(self) -> int | None:
        """n_ctx when the file gives it (for an openai member: the upstream's context if it reports none)."""
        return self.n_ctx if "n_ctx" in self.model_fields_set else None


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
    # exclude_unset: a member's n_ctx_given must still know which settings the file gave.
    return ChainConfig.model_validate(loaded.model_dump(exclude_unset=True))


def build_member_backend(member: MemberConfig) -> Backend:
    """The backend object for one member (not started)."""
    if member.kind == "openai":
        from server.gateway.backends.openai_upstream import OpenAIUpstreamBackend

        assert member.url is not None
        upstream = OpenAIUpstreamBackend(
            member.url, api_key=member.api_key, n_parallel=member.n_parallel, n_ctx=member.n_ctx_given,
            model=member.model,
            connect_timeout_s=member.connect_timeout_s, health_interval_s=member.health_interval_s,
            health_url=member.health_url, dialect_name=member.dialect,
            capabilities=frozenset(member.capabilities) if member.capabilities is not None else None)
        upstream.name = member.name
        return upstream

    from server.gateway.backends.embedded import EmbeddedBackend

    # The member is an EngineConfig (validated as part of the chain file): the engine takes it as it is.
    embedded = EmbeddedBackend(member, model_id=member.model)
    embedded.name = member.name
    return embedded
