"""Toolchain: which backend programs this machine has. Probing is the side effect; the value is plain data."""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys

from pydantic import BaseModel, ConfigDict, Field


class Toolchain(BaseModel):
    """Programs the arg builders put at the front of argv, and whether each backend is installed."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    python: str = "python3"
    has_sglang: bool = False
    llama_server: str | None = Field(default=None, description="path of llama-server, None if not on PATH")
    edgeserve: tuple[str, ...] = ("edgeserve",)
    cpu_threads: int = Field(default=1, ge=1)
    engine_gpu_offload: bool = Field(
        default=False, description="the embedded engine's llama.cpp (llama-cpp-python) has a GPU backend"
    )

    @property
    def has_llama_server(self) -> bool:
        return self.llama_server is not None


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _engine_gpu_offload() -> bool:
    try:
        import llama_cpp.llama_cpp as lc
    except (ImportError, OSError):
        return False
    return bool(lc.llama_supports_gpu_offload())


def probe_toolchain() -> Toolchain:
    """Look at PATH and the Python environment (no backend is started)."""
    edgeserve = shutil.which("edgeserve")
    return Toolchain(
        python=sys.executable or "python3",
        has_sglang=importlib.util.find_spec("sglang") is not None,
        llama_server=shutil.which("llama-server"),
        edgeserve=(edgeserve,) if edgeserve else (sys.executable, "-m", "server.cli.app"),
        cpu_threads=_usable_cpus(),
        engine_gpu_offload=_engine_gpu_offload(),
    )
