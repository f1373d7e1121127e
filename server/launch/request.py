"""LaunchRequest: what the user asked for on the command line (None = not given, let the profile decide)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

BackendRequest = Literal["auto", "sglang", "llama-server", "embedded"]


class LaunchRequest(BaseModel):
    """`edgeserve launch` flags. Values left None come from the card's profile, the environment or a rule."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    backend: str = "auto"
    card: str = "auto"
    gpus: int | None = Field(default=None, ge=0)
    model: str | None = None
    ctx: int | None = Field(default=None, ge=16, description="context of one sequence, tokens")
    parallel: int | None = Field(default=None, ge=1)
    kv_type: str | None = None
    mem_fraction: float | None = Field(default=None, gt=0.1, le=0.99)
    n_gpu_layers: int | None = Field(default=None, ge=-1)
    host: str = "127.0.0.1"
    port: int | None = Field(default=None, ge=1, le=65535)
    api_key: str | None = Field(default=None, repr=False)

    def profile_overrides(self) -> dict[str, Any]:
        """The flags that override profile keys, under the profile's names (only those given)."""
        pairs = {
            "context": self.ctx,
            "max_num_seqs": self.parallel,
            "kv_cache_dtype": self.kv_type,
            "mem_fraction_static": self.mem_fraction,
            "n_gpu_layers": self.n_gpu_layers,
        }
        return {k: v for k, v in pairs.items() if v is not None}
