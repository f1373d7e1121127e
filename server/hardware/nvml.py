"""The NVML edge: the one module that calls nvidia-ml-py, read-only, into the values of gpu_info.py.

Every optional query goes through `_try`: a card or driver that does not support it gives None, never an
error. NVML is initialised once per process; a failure is not cached, so a long-running gateway sees a driver
loaded later. Setting anything (power limits, clocks) is not done here: `edgeserve host-setup` runs the
nvidia-smi commands it prints, so what an operator reads is exactly what runs.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from server.hardware.cpu import read_text
from server.hardware.gpu_info import (
    ClockReason,
    ComputeMode,
    GpuInfo,
    GpuLink,
    GpuSample,
    P2PStatus,
    ProcessInfo,
    SupportedClocks,
    TopologyLevel,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

COMPUTE_MODES: dict[int, ComputeMode] = {
    0: "default", 1: "exclusive_thread", 2: "prohibited", 3: "exclusive_process",
}
# nvmlClocksEventReason* bits (nvml.h); 0x200 and 0x400 have no name in nvidia-smi's list and are left out.
CLOCK_REASON_BITS: dict[int, ClockReason] = {
    0x001: "gpu_idle",
    0x002: "applications_clocks_setting",
    0x004: "sw_power_cap",
    0x008: "hw_slowdown",
    0x010: "sync_boost",
    0x020: "sw_thermal_slowdown",
    0x040: "hw_thermal_slowdown",
    0x080: "hw_power_brake_slowdown",
    0x100: "display_clock_setting",
}
TOPOLOGY_LEVELS: dict[int, TopologyLevel] = {
    0: "internal", 10: "single", 20: "multiple", 30: "hostbridge", 40: "node", 50: "system",
}
P2P_STATUS: dict[int, P2PStatus] = {
    0: "ok", 1: "chipset_not_supported", 2: "gpu_not_supported", 3: "ioh_topology_not_supported",
    4: "disabled_by_regkey", 5: "not_supported", 6: "unknown",
}
# pynvml defines NVML_P2P_CAPS_INDEX_READ as `0,` (a tuple), which ctypes rejects: pass nvml.h's value.
P2P_CAPS_INDEX_READ = 0
NVML_CLOCK_SM = 1
NVML_CLOCK_MEM = 2
NVML_MEMORY_ERROR_TYPE_UNCORRECTED = 1
NVML_VOLATILE_ECC = 0
# The graphics clocks kept per memory clock: enough to validate a request, short enough for a snapshot file.
_MAX_SUPPORTED_MEMORY_CLOCKS = 8


@dataclass(frozen=True)
class NvmlReading:
    """One pass over NVML: the devices, how each pair is linked, and the driver."""

    gpus: tuple[GpuInfo, ...]
    links: tuple[GpuLink, ...]
    driver_version: str | None
    cuda_version: str | None


_lock = threading.Lock()
_state: dict[str, Any] = {}


def nvml() -> tuple[Any, str | None]:
    """(the pynvml module, None) once NVML is initialised (once per process), else (None, why not)."""
    with _lock:
        if "module" in _state:
            return _state["module"], _state.get("error")
        try:
            import pynvml
        except ImportError as exc:  # the dependency is pinned, but keep the CPU path alive without it
            _state.update(module=None, error=f"nvidia-ml-py is not installed ({exc})")
            return None, _state["error"]
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            return None, f"NVML unavailable: {exc} (no NVIDIA driver or GPU)"
        except OSError as exc:
            return None, f"NVML unavailable: {exc}"
        _state.update(module=pynvml, error=None)
        return pynvml, None


def _try(fn: Callable[..., T], *args: Any) -> T | None:
    """An optional NVML query: None where the device or driver does not support it."""
    try:
        return fn(*args)
    except Exception as exc:  # NVMLError subclasses per code, plus version-mismatch errors
        log.debug("NVML %s failed: %s", getattr(fn, "__name__", fn), exc)
        return None


def text(value: Any) -> str | None:
    if value is None:
        return None
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def watts(milliwatts: Any) -> float | None:
    return round(milliwatts / 1000.0, 1) if isinstance(milliwatts, int | float) else None


def cuda_version_string(version: int | None) -> str | None:
    """NVML's CUDA driver version integer (12040) as '12.4'."""
    if not version:
        return None
    return f"{version // 1000}.{(version % 1000) // 10}"


def clock_reasons(mask: int | None) -> tuple[ClockReason, ...] | None:
    """The names of the bits set in an NVML clock-event mask, lowest bit first."""
    if mask is None:
        return None
    return tuple(name for bit, name in CLOCK_REASON_BITS.items() if mask & bit)


def _process_name(pid: int) -> str | None:
    name = read_text(f"/proc/{pid}/comm").strip()
    return name or None


def _has_nvlink(nv: Any, handle: Any) -> bool | None:
    """True if any NVLink is active; None where NVLink is not supported at all."""
    seen_any = False
    for link in range(int(getattr(nv, "NVML_NVLINK_MAX_LINKS", 18))):
        state = _try(nv.nvmlDeviceGetNvLinkState, handle, link)
        if state is None:
            break
        seen_any = True
        if state == getattr(nv, "NVML_FEATURE_ENABLED", 1):
            return True
    return False if seen_any else None


def _supported_clocks(nv: Any, handle: Any) -> tuple[SupportedClocks, ...]:
    memory = _try(nv.nvmlDeviceGetSupportedMemoryClocks, handle) or []
    out = []
    for mem in sorted(memory, reverse=True)[:_MAX_SUPPORTED_MEMORY_CLOCKS]:
        graphics = _try(nv.nvmlDeviceGetSupportedGraphicsClocks, handle, mem) or []
        out.append(SupportedClocks(memory_mhz=int(mem), graphics_mhz=tuple(sorted(int(g) for g in graphics))))
    return tuple(out)


def _ecc(nv: Any, handle: Any) -> tuple[bool | None, int | None]:
    mode = _try(nv.nvmlDeviceGetEccMode, handle)
    if mode is None:
        return None, None
    enabled = bool(mode[0])
    errors = (
        _try(nv.nvmlDeviceGetTotalEccErrors, handle, NVML_MEMORY_ERROR_TYPE_UNCORRECTED, NVML_VOLATILE_ECC)
        if enabled
        else None
    )
    return enabled, errors


def _applications_clocks(nv: Any, handle: Any) -> tuple[int, int] | None:
    mem = _try(nv.nvmlDeviceGetApplicationsClock, handle, NVML_CLOCK_MEM)
    sm = _try(nv.nvmlDeviceGetApplicationsClock, handle, NVML_CLOCK_SM)
    return (int(mem), int(sm)) if mem and sm else None


def read_gpu(nv: Any, index: int) -> GpuInfo:
    """Everything NVML tells about device `index`; only the name and memory are required."""
    h = nv.nvmlDeviceGetHandleByIndex(index)
    mem = nv.nvmlDeviceGetMemoryInfo(h)
    util = _try(nv.nvmlDeviceGetUtilizationRates, h)
    constraints = _try(nv.nvmlDeviceGetPowerManagementLimitConstraints, h)
    pci = _try(nv.nvmlDeviceGetPciInfo, h)
    procs = _try(nv.nvmlDeviceGetComputeRunningProcesses, h) or []
    cc = _try(nv.nvmlDeviceGetCudaComputeCapability, h)
    persistence = _try(nv.nvmlDeviceGetPersistenceMode, h)
    mode = _try(nv.nvmlDeviceGetComputeMode, h)
    ecc_enabled, ecc_errors = _ecc(nv, h)
    return GpuInfo(
        index=index,
        name=text(nv.nvmlDeviceGetName(h)) or f"GPU {index}",
        uuid=text(_try(nv.nvmlDeviceGetUUID, h)),
        pci_bus_id=text(getattr(pci, "busId", None)),
        memory_total_bytes=int(mem.total),
        memory_free_bytes=int(mem.free),
        memory_used_bytes=int(mem.used),
        compute_capability=(int(cc[0]), int(cc[1])) if cc else None,
        power_limit_w=watts(_try(nv.nvmlDeviceGetPowerManagementLimit, h)),
        power_default_limit_w=watts(_try(nv.nvmlDeviceGetPowerManagementDefaultLimit, h)),
        power_min_limit_w=watts(constraints[0]) if constraints else None,
        power_max_limit_w=watts(constraints[1]) if constraints else None,
        power_draw_w=watts(_try(nv.nvmlDeviceGetPowerUsage, h)),
        temperature_c=_try(nv.nvmlDeviceGetTemperature, h, nv.NVML_TEMPERATURE_GPU),
        utilization_gpu_pct=getattr(util, "gpu", None),
        utilization_memory_pct=getattr(util, "memory", None),
        pcie_gen_current=_try(nv.nvmlDeviceGetCurrPcieLinkGeneration, h),
        pcie_gen_max=_try(nv.nvmlDeviceGetGpuMaxPcieLinkGeneration, h)
        or _try(nv.nvmlDeviceGetMaxPcieLinkGeneration, h),
        pcie_width_current=_try(nv.nvmlDeviceGetCurrPcieLinkWidth, h),
        pcie_width_max=_try(nv.nvmlDeviceGetMaxPcieLinkWidth, h),
        has_nvlink=_has_nvlink(nv, h),
        persistence_mode=None if persistence is None else bool(persistence),
        compute_mode=None if mode is None else COMPUTE_MODES.get(int(mode)),
        clock_reasons=clock_reasons(_try(nv.nvmlDeviceGetCurrentClocksEventReasons, h)),
        clock_sm_mhz=_try(nv.nvmlDeviceGetClockInfo, h, NVML_CLOCK_SM),
        clock_sm_max_mhz=_try(nv.nvmlDeviceGetMaxClockInfo, h, NVML_CLOCK_SM),
        clock_memory_max_mhz=_try(nv.nvmlDeviceGetMaxClockInfo, h, NVML_CLOCK_MEM),
        applications_clocks_mhz=_applications_clocks(nv, h),
        supported_clocks=_supported_clocks(nv, h),
        ecc_enabled=ecc_enabled,
        ecc_uncorrected_errors=ecc_errors,
        processes=tuple(
            ProcessInfo(
                pid=int(p.pid),
                used_memory_bytes=int(p.usedGpuMemory) if p.usedGpuMemory is not None else None,
                name=_process_name(int(p.pid)),
            )
            for p in procs
        ),
    )


def read_links(nv: Any, count: int) -> tuple[GpuLink, ...]:
    """Topology and peer-read status of every pair of devices (none for a single GPU)."""
    handles = [nv.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
    links = []
    for a in range(count):
        for b in range(a + 1, count):
            level = _try(nv.nvmlDeviceGetTopologyCommonAncestor, handles[a], handles[b])
            p2p = _try(nv.nvmlDeviceGetP2PStatus, handles[a], handles[b], P2P_CAPS_INDEX_READ)
            links.append(GpuLink(
                a=a,
                b=b,
                topology=None if level is None else TOPOLOGY_LEVELS.get(int(level)),
                p2p_read=None if p2p is None else P2P_STATUS.get(int(p2p), "unknown"),
            ))
    return tuple(links)


def read_all(nv: Any) -> NvmlReading:
    """Devices, links and driver in one pass. Raises whatever NVML raises for a required figure."""
    driver = text(_try(nv.nvmlSystemGetDriverVersion))
    cuda = cuda_version_string(_try(nv.nvmlSystemGetCudaDriverVersion_v2))
    count = nv.nvmlDeviceGetCount()
    gpus = tuple(read_gpu(nv, i) for i in range(count))
    return NvmlReading(gpus=gpus, links=read_links(nv, count), driver_version=driver, cuda_version=cuda)


def read_samples(nv: Any) -> tuple[GpuSample, ...]:
    """Memory used, utilisation, temperature and power per GPU: the cheap figures a scrape asks for."""
    samples = []
    for i in range(nv.nvmlDeviceGetCount()):
        h = nv.nvmlDeviceGetHandleByIndex(i)
        mem = nv.nvmlDeviceGetMemoryInfo(h)
        util = _try(nv.nvmlDeviceGetUtilizationRates, h)
        samples.append(
            GpuSample(
                index=i,
                name=text(nv.nvmlDeviceGetName(h)) or f"GPU {i}",
                memory_used_bytes=int(mem.used),
                memory_total_bytes=int(mem.total),
                utilization_gpu_pct=getattr(util, "gpu", None),
                temperature_c=_try(nv.nvmlDeviceGetTemperature, h, nv.NVML_TEMPERATURE_GPU),
                power_draw_w=watts(_try(nv.nvmlDeviceGetPowerUsage, h)),
            )
        )
    return tuple(samples)
