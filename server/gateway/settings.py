"""Gateway configuration: one frozen settings object, from EDGESERVE_* environment variables or the CLI."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from server.gateway.sampling_defaults import DEFAULT_SAMPLING_DEFAULTS, SAMPLING_DEFAULTS, sampling_defaults

BackendKind = Literal["embedded", "openai"]


class GatewaySettings(BaseSettings):
    """Everything `create_app` needs. Environment: EDGESERVE_<FIELD>, e.g. EDGESERVE_MAX_QUEUE=32."""

    model_config = SettingsConfigDict(env_prefix="EDGESERVE_", frozen=True, extra="ignore")

    backend: BackendKind = "embedded"
    model_path: Path | None = Field(default=None, description="GGUF of the embedded engine; default: bundled")
    model_name: str | None = Field(default=None, description="id served at /v1/models; default: file stem")
    upstream_url: str | None = Field(default=None, description="base URL of a remote OpenAI server")
    upstream_api_key: str | None = None

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)

    parallel: int = Field(default=4, ge=1, le=1024, description="sequences run at once (engine slots)")
    ctx: int | None = Field(
        default=None, ge=16,
        description="embedded: KV cache tokens shared by all sequences (llama-server -c); openai: the "
        "upstream's context per sequence when it does not report one",
    )
    n_gpu_layers: int = Field(default=-1, ge=-1, description="-1: all layers on the GPU when there is one")
    n_batch: int | None = Field(default=None, ge=1, description="tokens per engine step (prefill budget)")
    n_threads: int | None = Field(default=None, ge=1, description="CPU threads of the engine (default: all)")

    api_key: str | None = Field(default=None, description="clients must send `Authorization: Bearer <key>`")

    max_queue: int = Field(default=64, ge=0, description="requests waiting for a slot before 429")
    queue_timeout_s: float = Field(default=60.0, gt=0, description="longest wait for a slot before 408")
    request_timeout_s: float = Field(default=600.0, gt=0, description="longest time for a whole request")
    retry_after_s: int = Field(default=1, ge=1, description="Retry-After sent with 408, 429 and 503")
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
        default=None, description="YAML fallback chain (configs/gateway.example.yaml); overrides backend")
    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024, description="larger request bodies get 413")
    metrics_require_api_key: bool = Field(default=False, description="/metrics needs the API key too")

    @field_validator("sampling_defaults")
    @classmethod
    def _check_sampling_defaults(cls, value: str) -> str:
        sampling_defaults(value)
        return value

    @model_validator(mode="after")
    def _check_backend(self) -> GatewaySettings:
        if self.backend == "openai" and not self.upstream_url:
            raise ValueError("backend 'openai' needs upstream_url (--upstream URL)")
        return self
