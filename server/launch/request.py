"""LaunchRequest: what the user asked for on the command line (None = not given, let the profile decide)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from server.launch.plan import FlashAttn
from server.launch.profile import Profile

BackendRequest = Literal["auto", "sglang", "llama-server", "embedded"]


class LaunchRequest(BaseModel):
    """`edgeserve launch` flags. Settings are named as the profile's keys (n_ctx, n_parallel, kv_type, ...):
    values left None come from the card's profile, the environment or a rule; the profile validates them."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    backend: str = "auto"
    card: str = "auto"
    gpus: int | None = Field(default=None, ge=0)
    model_path: str | None = Field(default=None, description="GGUF file or HF folder (default: bundled)")
    host: str = "127.0.0.1"
    port: int | None = Field(default=None, ge=1, le=65535)
    api_key: str | None = Field(default=None, repr=False)
    force: bool = Field(default=False, description="start even where the memory check says it does not fit")
    gateway: bool = Field(
        default=True, description="put edgeserve's gateway in front of llama-server or SGLang (on --port)"
    )
    backend_port: int | None = Field(
        default=None, ge=1, le=65535, description="the backend's own port behind the gateway"
    )
    model_name: str | None = Field(default=None, description="model id served at /v1/models (default: file)")

    n_ctx: int | None = Field(default=None, description="context of ONE sequence, tokens")
    n_parallel: int | None = None
    kv_type: str | None = None
    flash_attn: FlashAttn | None = None
    kv_unified: bool | None = None
    backend_sampling: bool | None = None
    n_batch: int | None = None
    n_ubatch: int | None = None
    n_threads: int | None = None
    n_gpu_layers: int | None = None
    mem_fraction: float | None = None
    shutdown_grace_s: float | None = None

    def profile_overrides(self) -> dict[str, Any]:
        """The flags that override profile keys (only those given): the names are the same. (`card` picks the
        profile; the profile's own `card` key only names the file's card.)"""
        return self.model_dump(include=set(Profile.model_fields) - {"card"}, exclude_none=True)
