"""What the llama.cpp build can run: GPU offload, its ggml backends and CUDA architectures, its CUDA runtime.

Read from llama-cpp-python (`llama_supports_gpu_offload()`, `llama_print_system_info()`: every ggml backend
with its features, e.g. `CUDA : ARCHS = 610,900 | USE_GRAPHS = 1 | CPU : AVX2 = 1 | ...`) and from the
shared libraries the process has mapped (the CUDA runtime's file name carries its version). The parsing is
pure; `probe_llama_build()` is the edge, and a missing or broken llama-cpp-python is a value, not an error.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterable, Mapping

from pydantic import BaseModel, ConfigDict, Field

_CUDART = re.compile(r"libcudart\.so\.(\d+)(?:\.(\d+))?")


class LlamaBuild(BaseModel):
    """The llama.cpp that llama-cpp-python loads in this Python."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    importable: bool
    version: str | None = Field(default=None, description="llama-cpp-python's version")
    supports_gpu_offload: bool = False
    backends: Mapping[str, Mapping[str, str]] = Field(
        default_factory=dict, description="ggml backend -> its features, from llama_print_system_info()"
    )
    cuda_runtime: str | None = Field(default=None, description="'13.0' or '12' from the libcudart mapped")
    error: str | None = None

    @property
    def cuda_archs(self) -> tuple[int, ...]:
        """The compute capabilities compiled in, as nvcc's __CUDA_ARCH_LIST__ writes them (610 = CC 6.1)."""
        return parse_archs(self.backends.get("CUDA", {}).get("ARCHS", ""))

    @property
    def cuda_major(self) -> int | None:
        return int(self.cuda_runtime.split(".")[0]) if self.cuda_runtime else None


class LlamaServerBuild(BaseModel):
    """The llama-server on PATH and the devices it can offload to (`llama-server --list-devices`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    path: str
    devices: tuple[str, ...] = Field(default=(), description="e.g. 'CUDA0: NVIDIA H200 (143156 MiB, ...)'")
    error: str | None = None

    @property
    def has_cuda(self) -> bool:
        return any(d.startswith("CUDA") for d in self.devices)


def parse_list_devices(output: str) -> tuple[str, ...]:
    """The device lines under `Available devices:` (none for a CPU build, which prints `(none)`)."""
    lines = output.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == "Available devices:")
    except StopIteration:
        return ()
    devices = []
    for line in lines[start + 1:]:
        if not line.startswith("  ") or line.strip() == "(none)":
            break
        devices.append(line.strip())
    return tuple(devices)


def parse_system_info(info: str) -> dict[str, dict[str, str]]:
    """`llama_print_system_info()` -> {backend: {feature: value}}; a ` : ` item starts the next backend."""
    backends: dict[str, dict[str, str]] = {}
    current: dict[str, str] | None = None
    for item in (part.strip() for part in info.split("|")):
        if not item:
            continue
        if " : " in item:
            name, _, item = item.partition(" : ")
            current = backends.setdefault(name.strip(), {})
        if current is None:
            continue
        key, _, value = item.partition("=")
        if key.strip():
            current[key.strip()] = value.strip()
    return backends


def parse_archs(text: str) -> tuple[int, ...]:
    """'610,750,900' (or with ';' or spaces) -> (610, 750, 900)."""
    return tuple(sorted({int(x) for x in re.findall(r"\d+", text)}))


def cuda_runtime_from_libraries(paths: Iterable[str]) -> str | None:
    """'13.0' from a mapped libcudart.so.13.0.96 ('12' when only the major is in the name); None without."""
    for path in paths:
        match = _CUDART.search(path)
        if match:
            return match.group(1) if match.group(2) is None else f"{match.group(1)}.{match.group(2)}"
    return None


def arch_of(cc: tuple[int, int]) -> int:
    """CC (6, 1) -> 610, as nvcc numbers architectures."""
    return cc[0] * 100 + cc[1] * 10


# --- the edge ---------------------------------------------------------------------------------


def _mapped_libraries() -> list[str]:
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as fh:
            return [line.split()[-1] for line in fh if ".so" in line]
    except OSError:
        return []


def probe_llama_build() -> LlamaBuild:
    """Import llama-cpp-python and ask its llama.cpp what it was built with. Never raises."""
    try:
        import llama_cpp
    except Exception as exc:  # ImportError, or OSError when its shared libraries do not load
        return LlamaBuild(importable=False, error=f"llama-cpp-python does not import: {exc}")
    try:
        info = llama_cpp.llama_print_system_info()
        text = info.decode(errors="replace") if isinstance(info, bytes) else str(info)
        return LlamaBuild(
            importable=True,
            version=getattr(llama_cpp, "__version__", None),
            supports_gpu_offload=bool(llama_cpp.llama_supports_gpu_offload()),
            backends=parse_system_info(text),
            cuda_runtime=cuda_runtime_from_libraries(_mapped_libraries()),
        )
    except Exception as exc:
        return LlamaBuild(importable=True, version=getattr(llama_cpp, "__version__", None),
                          error=f"llama.cpp did not describe its build: {exc}")


def probe_llama_server(path: str, timeout_s: float = 30.0) -> LlamaServerBuild:
    """Ask a llama-server binary which devices it sees (it initialises its backends and exits)."""
    try:
        proc = subprocess.run([path, "--list-devices"], capture_output=True, text=True, timeout=timeout_s,
                              check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return LlamaServerBuild(path=path, error=f"{path} --list-devices failed: {exc}")
    if proc.returncode != 0 or "Available devices:" not in proc.stdout:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return LlamaServerBuild(path=path, error=f"{path} --list-devices exited {proc.returncode}: {tail[0]}")
    return LlamaServerBuild(path=path, devices=parse_list_devices(proc.stdout))
