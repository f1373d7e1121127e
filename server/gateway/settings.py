"""Gateway configuration: one frozen settings object, from EDGESERVE_* environment variables or the CLI.

The engine's settings are not repeated here: `engine` is the engine's own EngineConfig, read from
EDGESERVE_ENGINE__<FIELD> (e.g. EDGESERVE_ENGINE__N_CTX=4096) or `edgeserve serve --<field>`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from server.engine.config import EngineConfig
from server.gateway.sampling_defaults import DEFAULT_SAMPLING_DEFAULTS, SAMPLING_DEFAULTS, sampling_defaults

BackendKind = Literal["embedded", "openai"]
ToolPrompt = Literal["model", "generic"]
# What many clients send as the model name whatever the server: the README's examples use it.
DEFAULT_ALIAS = "edgeserve"


class GatewaySettings(BaseSettings):
    """Everything `create_app` needs. Environment: EDGESERVE_<FIELD>, e.g. EDGESERVE_MAX_QUEUE=32, and
    EDGESERVE_ENGINE__<FIELD> for the engine's."""

    model_config = SettingsConfigDict(
        env_prefix="EDGESERVE_", env_nested_delimiter="__", frozen=True, extra="ignore"
    )

    backend: BackendKind = "embedded"
    engine: EngineConfig = Field(
        default_factory=EngineConfig,
        description="the embedded engine's settings; with --backend openai, n_parallel is the requests sent "
        "upstream at once and n_ctx (when given) the upstream's context per sequence if it reports none",
    )
    model_name: str | None = Field(default=None, description="id served at /v1/models; default: file stem")
    served_model_names: list[str] | None = Field(
        default=None,
        description="model names requests may ask for (others: 404 model_not_found); default: the model id "
        f"and {DEFAULT_ALIAS!r}",
    )
    tool_prompt: ToolPrompt = Field(
        default="model",
        description="tool_choice auto on a model whose chat template cannot render tools: model (a 400) or "
        "generic (edgeserve's own tool prompt)",
    )
    upstream_url: str | None = Field(default=None, description="base URL of a remote OpenAI server")
    upstream_api_key: str | None = None
    upstream_dialect: str = Field(
        default="auto",
        description="the upstream's dialect: auto (from its /v1/models), edgeserve, llama-server, sglang, "
        "llama-cpp-python or openai",
    )

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)

    api_key: str | None = Field(default=None, description="clients must send `Authorization: Bearer <key>`")

    max_queue: int = Field(default=64, ge=0, description="requests waiting for a slot before 429")
    queue_timeout_s: float = Field(default=60.0, gt=0, description="longest wait for a slot before 408")
    request_timeout_s: float = Field(default=600.0, gt=0, description="longest time for a whole request")
    retry_after_s: int = Field(default=1, ge=1, description="Retry-After sent with 408, 429 and 503")
    shutdown_grace_s: float = Field(
        default=30.0, ge=0,
        description="on SIGTERM, how long requests in flight may take to finish before their streams are "
        "ended (with an error event and [DONE]); new requests get 503 meanwhile",
    )
    default_completion_max_tokens: int = Field(default=16, ge=1, description="/v1/completions default")
    sampling_defaults: str = Field(
        default=DEFAULT_SAMPLING_DEFAULTS,
        description=f"values for sampling fields a request leaves out: {' | '.join(SAMPLING_DEFAULTS)}",
    )

    upstream_connect_timeout_s: float = Field(default=5.0, gt=0)
    upstream_health_interval_s: float = Field(default=2.0, gt=0)

    enable_gpu_metrics: bool = True

    # Reliability (fallback.py, security.py).
    chain_config: Path | None = Field(
        default=None,
        description="YAML fallback chain (server/gateway/chain.example.yaml); overrides backend",
    )
    models_file: Path | None = Field(
        default=None,
        description="YAML models file (server/gateway/models.example.yaml): several models behind this port, "
        "loaded on demand and evicted by the memory plan; overrides backend",
    )
    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024, description="larger request bodies get 413")
    metrics_require_api_key: bool = Field(default=False, description="/metrics needs the API key too")

    @field_validator("upstream_dialect")
    @classmethod
    def _check_dialect(cls, value: str) -> str:
        if value != "auto":
            from server.gateway.backends.dialects import dialect

            dialect(value)
        return value

    @field_validator("sampling_defaults")
    @classmethod
    def _check_sampling_defaults(cls, value: str) -> str:
        sampling_defaults(value)
        return value

    @model_validator(mode="after")
    def _check_backend(self) -> GatewaySettings:
        if self.backend == "openai" and not self.upstream_url:
            raise ValueError("backend 'openai' needs upstream_url (--upstream-url URL)")
        return self

    @property
    def upstream_n_ctx(self) -> int | None:
        """The upstream's context per sequence when it reports none: engine.n_ctx, if it was given."""
        return self.engine.n_ctx if "n_ctx" in self.engine.model_fields_set else None
