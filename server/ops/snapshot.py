"""HostSnapshot: everything `edgeserve doctor` and `edgeserve host-setup` judge, as one frozen JSON value.

A snapshot saved on one machine (`edgeserve doctor --save-snapshot`) is judged the same way anywhere
(`--snapshot`): that is how the checks are tested without the hardware they describe.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from server.hardware.detect import Detection
from server.llama.build import LlamaBuild, LlamaServerBuild

SNAPSHOT_VERSION = 1


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class SglangInstall(_Frozen):
    """SGLang and the torch under it, as far as they could be looked at without starting a server."""

    installed: bool
    version: str | None = None
    torch_version: str | None = None
    torch_cuda: str | None = Field(default=None, description="torch.version.cuda; None for a CPU build")
    cuda_available: bool | None = Field(default=None, description="torch.cuda.is_available(); None: unasked")
    error: str | None = None


class NcclInstall(_Frozen):
    """NCCL as the multi-GPU backends would load it (SGLang through torch)."""

    version: str | None = None
    source: str | None = Field(default=None, description="where the version came from: torch or libnccl")
    error: str | None = None


class DiskSpace(_Frozen):
    path: str
    free_bytes: int = Field(ge=0)
    total_bytes: int = Field(ge=0)


class PortState(_Frozen):
    host: str
    port: int = Field(ge=1, le=65535)
    role: Literal["gateway", "backend"]
    in_use: bool
    error: str | None = None


class PlannedUse(_Frozen):
    """What `edgeserve launch` would run here, and the memory it expects (per GPU, or RAM on the CPU)."""

    backend: str | None = None
    card: str | None = None
    gpus: int = Field(default=0, ge=0)
    model_path: str | None = None
    model_bytes: int | None = None
    n_ctx: int | None = None
    n_parallel: int | None = None
    expected_bytes: int | None = Field(default=None, description="per GPU, or in RAM when gpus is 0")
    port: int | None = Field(default=None, description="the backend's own port")
    error: str | None = Field(default=None, description="why no plan could be made")


class HostSnapshot(_Frozen):
    version: int = SNAPSHOT_VERSION
    taken_at: str = Field(description="ISO 8601, UTC")
    detection: Detection
    llama_build: LlamaBuild
    llama_server: LlamaServerBuild | None = Field(default=None, description="None: no llama-server on PATH")
    sglang: SglangInstall
    nccl: NcclInstall | None = Field(default=None, description="looked at only with several GPUs")
    disk: DiskSpace | None = None
    ports: tuple[PortState, ...] = ()
    plan: PlannedUse | None = None
