"""Toolchain: which backend programs this machine has. Probing is the side effect; the value is plain data."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import sys
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

# The checkout (where setup_sglang.sh makes .venv-sglang).
REPO_ROOT = Path(__file__).resolve().parents[2]


class Toolchain(BaseModel):
    """Programs the arg builders put at the front of argv, and whether each backend is installed."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    python: str = "python3"
    has_sglang: bool = False
    sglang_python: str | None = Field(default=None, description="a Python whose SGLang can serve")
    rpc_server: str | None = Field(default=None, description="path of llama.cpp's rpc-server, if built")
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


def _llama_tool(name: str) -> str | None:
    """A llama.cpp program: next to this Python first (setup_env.sh links the ones it builds into
    .venv/bin), else on PATH."""
    beside = Path(sys.prefix) / "bin" / name
    return str(beside) if beside.is_file() and os.access(beside, os.X_OK) else shutil.which(name)


def _torch_has_cuda(version_file: Path) -> bool:
    """Whether a torch install was built with CUDA, read from its version.py (importing torch takes
    seconds): a CPU build says `cuda = None`."""
    try:
        text = version_file.read_text()
    except OSError:
        return False
    match = re.search(r"^cuda(?:: [^=]+)? = (.+)$", text, re.MULTILINE)
    if match is None:
        return False
    return match.group(1).strip() not in ("None", "''", '""')


def sglang_python(root: Path = REPO_ROOT) -> str | None:
    """A Python that can serve with SGLang: its own environment (.venv-sglang, made by setup_sglang.sh) or
    this one, with sglang importable and a CUDA build of torch. The test environment's SGLang (a CPU torch,
    there only for SGLang's own argument parser) does not count: it cannot serve."""
    own = root / ".venv-sglang"
    for site in sorted(own.glob("lib/python3*/site-packages")):
        if (site / "sglang").is_dir() and _torch_has_cuda(site / "torch" / "version.py"):
            return str(own / "bin" / "python")
    sglang = importlib.util.find_spec("sglang")
    torch = importlib.util.find_spec("torch")
    if sglang is not None and torch is not None and torch.origin:
        cuda = _torch_has_cuda(Path(torch.origin).parent / "version.py")
        return sys.executable if cuda else None
    return None


def probe_toolchain() -> Toolchain:
    """Look at PATH and the Python environment (no backend is started)."""
    edgeserve = shutil.which("edgeserve")
    sglang = sglang_python()
    return Toolchain(
        python=sys.executable or "python3",
        has_sglang=sglang is not None,
        sglang_python=sglang,
        llama_server=_llama_tool("llama-server"),
        rpc_server=_llama_tool("ggml-rpc-server"),
        edgeserve=(edgeserve,) if edgeserve else (sys.executable, "-m", "server.cli.app"),
        cpu_threads=_usable_cpus(),
        engine_gpu_offload=_engine_gpu_offload(),
    )
