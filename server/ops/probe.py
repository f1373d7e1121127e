"""The doctor's edge: look at this machine once and return a HostSnapshot.

It reads NVML, llama.cpp, SGLang, NCCL, the disk, the ports and the plan. Nothing here judges; nothing here
raises for a missing part.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import importlib.metadata
import importlib.util
import shutil
import socket
from datetime import datetime, timezone
from pathlib import Path

from server.hardware.detect import Detection, detect
from server.launch.planner import make_plan
from server.launch.request import LaunchRequest
from server.launch.toolchain import probe_toolchain
from server.llama.build import probe_llama_build, probe_llama_server
from server.ops.snapshot import DiskSpace, HostSnapshot, NcclInstall, PlannedUse, PortState, SglangInstall


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def probe_sglang(*, ask_torch: bool) -> SglangInstall:
    """Is SGLang installed, and (only when asked: importing torch takes seconds) does its torch see CUDA?"""
    if importlib.util.find_spec("sglang") is None:
        return SglangInstall(installed=False)
    install = SglangInstall(installed=True, version=_version("sglang"), torch_version=_version("torch"))
    if not ask_torch:
        return install
    try:
        import torch

        install = install.model_copy(update={"torch_cuda": torch.version.cuda,
                                             "cuda_available": bool(torch.cuda.is_available())})
    except Exception as exc:  # a broken torch install is a finding, not a crash
        return install.model_copy(update={"error": f"torch does not import: {exc}"})
    try:
        importlib.import_module("sglang")
    except Exception as exc:
        return install.model_copy(update={"error": f"sglang does not import: {exc}"})
    return install


def nccl_version_string(code: int) -> str:
    """ncclGetVersion's integer: 22105 -> '2.21.5' (NCCL 2.9 and later; older ones used major*1000)."""
    if code >= 10000:
        return f"{code // 10000}.{code % 10000 // 100}.{code % 100}"
    return f"{code // 1000}.{code % 1000 // 100}.{code % 100}"


def probe_nccl() -> NcclInstall:
    """NCCL through torch (what SGLang uses), else the system's libnccl."""
    if importlib.util.find_spec("torch") is not None:
        try:
            import torch

            if torch.cuda.is_available() and torch.distributed.is_nccl_available():
                version = torch.cuda.nccl.version()
                text = ".".join(str(v) for v in version) if isinstance(version, tuple) else str(version)
                return NcclInstall(version=text, source="torch")
        except Exception as exc:
            return NcclInstall(error=f"torch's NCCL: {exc}")
    name = ctypes.util.find_library("nccl")
    if name is None:
        return NcclInstall(error="no CUDA torch with NCCL and no libnccl on the library path")
    try:
        lib = ctypes.CDLL(name)
        code = ctypes.c_int()
        if lib.ncclGetVersion(ctypes.byref(code)) != 0:
            return NcclInstall(error=f"{name}: ncclGetVersion failed")
    except OSError as exc:
        return NcclInstall(error=f"{name}: {exc}")
    return NcclInstall(version=nccl_version_string(code.value), source=name)


def port_state(host: str, port: int, role: str) -> PortState:
    """In use when binding fails with EADDRINUSE (a listener on 0.0.0.0 counts for 127.0.0.1 too)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return PortState(host=host, port=port, role=role, in_use=True)  # type: ignore[arg-type]
            return PortState(host=host, port=port, role=role, in_use=False,  # type: ignore[arg-type]
                             error=f"cannot bind: {exc.strerror or exc}")
    return PortState(host=host, port=port, role=role, in_use=False)  # type: ignore[arg-type]


def disk_space(path: Path) -> DiskSpace | None:
    """Free space where models go (the nearest existing folder of `path`)."""
    folder = path if path.is_dir() else path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        usage = shutil.disk_usage(folder)
    except OSError:
        return None
    return DiskSpace(path=str(folder), free_bytes=usage.free, total_bytes=usage.total)


def planned_use(request: LaunchRequest) -> PlannedUse:
    try:
        plan = make_plan(request)
    except (ValueError, OSError) as exc:
        return PlannedUse(error=str(exc))
    return PlannedUse(backend=plan.backend, card=plan.card, gpus=plan.gpus, model_path=plan.model_path,
                      model_bytes=plan.model_bytes, n_ctx=plan.n_ctx, n_parallel=plan.n_parallel,
                      expected_bytes=plan.expected_total_bytes, port=plan.port)


def _ports(host: str, gateway_port: int, plan: PlannedUse) -> tuple[PortState, ...]:
    """The gateway's port, and the backend's own one where the gateway is in front of llama-server/SGLang."""
    ports = [port_state(host, gateway_port, "gateway")]
    if plan.backend not in (None, "embedded") and plan.port and plan.port != gateway_port:
        ports.append(port_state("127.0.0.1", plan.port, "backend"))
    return tuple(ports)


def take_snapshot(request: LaunchRequest, *, gateway_port: int, models_dir: Path | None = None,
                  detection: Detection | None = None) -> HostSnapshot:
    """Look at everything the doctor judges. `request` is what `edgeserve launch` would be asked for."""
    det = detection or detect()
    toolchain = probe_toolchain()
    plan = planned_use(request)
    model_dir = Path(request.model_path).parent if request.model_path else Path.cwd()
    return HostSnapshot(
        taken_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        detection=det,
        llama_build=probe_llama_build(),
        llama_server=probe_llama_server(toolchain.llama_server) if toolchain.llama_server else None,
        sglang=probe_sglang(ask_torch=not det.is_cpu_only),
        nccl=probe_nccl() if len(det.gpus) > 1 else None,
        disk=disk_space(models_dir or model_dir),
        ports=_ports(request.host, gateway_port, plan),
        plan=plan,
    )
