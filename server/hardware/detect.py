"""GPU detection through NVML (nvidia-ml-py), matched to the card table; the CPU when there is no GPU.

NVML is touched only in the `_nvml_*` functions at the bottom; everything that turns its figures into a
`Detection` (card matching, unknown-card rows, GPU sets, /proc parsing) is pure and tested without a GPU.
`detect()` never raises: no library, no driver or no device gives `Detection(is_cpu_only=True, reason=...)`.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from server.hardware.cards import Architecture, Card, GpuSet, Link, match_card
from server.hardware.cpu import CpuInfo, detect_cpu, parse_cpuinfo, parse_meminfo, read_text

log = logging.getLogger(__name__)

# The CPU side lives in server/cpu.py; re-exported because a Detection carries a CpuInfo.
__all__ = ["CpuInfo", "detect_cpu", "parse_cpuinfo", "parse_meminfo"]

T = TypeVar("T")


class ProcessInfo(BaseModel):
    """A compute process on a GPU."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    pid: int
    used_memory_bytes: int | None = None
    name: str | None = None


class GpuInfo(BaseModel):
    """One device as NVML reports it; optional figures are None where the device or driver does not say."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    index: int = Field(ge=0)
    name: str
    uuid: str | None = None
    pci_bus_id: str | None = None
    memory_total_bytes: int = Field(ge=0)
    memory_free_bytes: int = Field(ge=0)
    memory_used_bytes: int = Field(ge=0)
    compute_capability: tuple[int, int] | None = None
    power_limit_w: float | None = None
    power_default_limit_w: float | None = None
    power_max_limit_w: float | None = None
    power_draw_w: float | None = None
    temperature_c: int | None = None
    utilization_gpu_pct: int | None = None
    utilization_memory_pct: int | None = None
    pcie_gen_current: int | None = None
    pcie_gen_max: int | None = None
    pcie_width_current: int | None = None
    pcie_width_max: int | None = None
    has_nvlink: bool | None = None
    processes: tuple[ProcessInfo, ...] = ()
    card_id: str | None = Field(default=None, description="the matched table row; None for a card not in it")


class Detection(BaseModel):
    """What this machine offers: GPUs matched to a card (or the CPU only, with the reason)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    gpus: tuple[GpuInfo, ...] = ()
    card: Card | None = Field(
        default=None, description="the card of GPU 0; built from NVML if not in the table"
    )
    count: int = Field(default=0, ge=0, description="GPUs identical to GPU 0 (the set a plan may use)")
    is_cpu_only: bool
    reason: str | None = Field(
        default=None, description="why there is no GPU, or what is odd about the ones found"
    )
    driver_version: str | None = None
    cuda_version: str | None = None
    cpu: CpuInfo


class GpuSample(BaseModel):
    """Cheap per-GPU figures for metrics gauges and /v1/gpu/info."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    index: int
    name: str
    memory_used_bytes: int
    memory_total_bytes: int
    utilization_gpu_pct: int | None = None
    temperature_c: int | None = None
    power_draw_w: float | None = None


# --- pure parts --------------------------------------------------------------------------------


def architecture_for(cc: tuple[int, int] | None) -> Architecture:
    """The architecture family of a compute capability (CUDA programming guide numbering)."""
    if cc is None:
        return "unknown"
    major, minor = cc
    if major == 6:
        return "Pascal"
    if major == 7:
        return "Turing" if minor >= 5 else "Volta"
    if major == 8:
        return "Ada Lovelace" if minor >= 9 else "Ampere"
    if major == 9:
        return "Hopper"
    if major in (10, 11, 12):
        return "Blackwell"
    return "unknown"


def card_from_nvml(gpu: GpuInfo) -> Card:
    """A card row for a device the table does not know, from its own NVML figures (unknowns stay None)."""
    slug = re.sub(r"[^a-z0-9]+", "-", gpu.name.lower()).strip("-") or "gpu"
    tdp = gpu.power_default_limit_w or gpu.power_max_limit_w
    return Card(
        id=f"nvml-{slug}",
        names=(gpu.name,),
        architecture=architecture_for(gpu.compute_capability),
        chip=None,
        compute_capability=gpu.compute_capability or (0, 0),
        memory_bytes=max(gpu.memory_total_bytes, 1),
        nvml_memory_bytes=gpu.memory_total_bytes or None,
        memory_type=None,
        tdp_w=round(tdp) if tdp else None,
        pcie_gen=gpu.pcie_gen_max,
        has_nvlink=bool(gpu.has_nvlink),
        notes="not in the card table: figures from NVML only",
        is_from_table=False,
    )


def with_card_ids(gpus: Sequence[GpuInfo]) -> tuple[GpuInfo, ...]:
    """Each GPU with `card_id` set from the table (name plus memory: that tells the A100 40 from 80 GB)."""
    out = []
    for gpu in gpus:
        card = match_card(gpu.name, gpu.memory_total_bytes or None)
        out.append(gpu.model_copy(update={"card_id": card.id if card else None}))
    return tuple(out)


def _same_model(a: GpuInfo, b: GpuInfo) -> bool:
    return a.name == b.name and a.card_id == b.card_id


def build_detection(
    gpus: Sequence[GpuInfo],
    cpu: CpuInfo,
    *,
    driver_version: str | None = None,
    cuda_version: str | None = None,
    reason: str | None = None,
) -> Detection:
    """Assemble a Detection from raw device figures: match cards, count the set GPU 0 belongs to."""
    if not gpus:
        return Detection(
            is_cpu_only=True,
            reason=reason or "no NVIDIA GPU found",
            driver_version=driver_version,
            cuda_version=cuda_version,
            cpu=cpu,
        )
    matched = with_card_ids(gpus)
    first = matched[0]
    card = match_card(first.name, first.memory_total_bytes or None) or card_from_nvml(first)
    count = sum(1 for g in matched if _same_model(g, first))
    notes = [reason] if reason else []
    if count < len(matched):
        others = sorted({g.name for g in matched if not _same_model(g, first)})
        notes.append(f"mixed GPUs: planning for {count}x {first.name}; also present: {', '.join(others)}")
    return Detection(
        gpus=matched,
        card=card,
        count=count,
        is_cpu_only=False,
        reason="; ".join(notes) or None,
        driver_version=driver_version,
        cuda_version=cuda_version,
        cpu=cpu,
    )


def gpu_set_from_detection(det: Detection) -> GpuSet | None:
    """The GPU set a plan may use (the GPUs like GPU 0), with the measured memory and link; None on CPU."""
    if det.is_cpu_only or det.card is None or det.count == 0:
        return None
    same = [g for g in det.gpus if g.name == det.gpus[0].name and g.card_id == det.gpus[0].card_id]
    gens = [g.pcie_gen_max for g in same if g.pcie_gen_max]
    measured = min(g.memory_total_bytes for g in same) or None
    return GpuSet(
        card=det.card,
        count=det.count,
        link=Link(
            pcie_gen=min(gens) if gens else det.card.pcie_gen,
            has_nvlink=det.count > 1 and all(bool(g.has_nvlink) for g in same),
        ),
        measured_memory_bytes=measured,
    )


def cuda_version_string(version: int | None) -> str | None:
    """NVML's CUDA driver version integer (12040) as '12.4'."""
    if not version:
        return None
    return f"{version // 1000}.{(version % 1000) // 10}"


# --- edges: NVML ----------------------------------------------------------------------


_nvml_lock = threading.Lock()
_nvml_state: dict[str, Any] = {}


def _nvml() -> tuple[Any, str | None]:
    """(the pynvml module, None) once NVML is initialised (once per process), else (None, why not)."""
    with _nvml_lock:
        if "module" in _nvml_state:
            return _nvml_state["module"], _nvml_state.get("error")
        try:
            import pynvml
        except ImportError as exc:  # the dependency is pinned, but keep the CPU path alive without it
            _nvml_state.update(module=None, error=f"nvidia-ml-py is not installed ({exc})")
            return None, _nvml_state["error"]
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            # Not cached: a driver may be loaded later in a long-running process.
            return None, f"NVML unavailable: {exc} (no NVIDIA driver or GPU)"
        except OSError as exc:
            return None, f"NVML unavailable: {exc}"
        _nvml_state.update(module=pynvml, error=None)
        return pynvml, None


def _try(fn: Callable[..., T], *args: Any) -> T | None:
    """An optional NVML query: None where the device or driver does not support it."""
    try:
        return fn(*args)
    except Exception as exc:  # NVMLError subclasses per code, plus version-mismatch errors
        log.debug("NVML %s failed: %s", getattr(fn, "__name__", fn), exc)
        return None


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _watts(milliwatts: Any) -> float | None:
    return round(milliwatts / 1000.0, 1) if isinstance(milliwatts, int | float) else None


def _process_name(pid: int) -> str | None:
    name = read_text(f"/proc/{pid}/comm").strip()
    return name or None


def _nvml_gpu(nv: Any, index: int) -> GpuInfo:
    h = nv.nvmlDeviceGetHandleByIndex(index)
    mem = nv.nvmlDeviceGetMemoryInfo(h)
    util = _try(nv.nvmlDeviceGetUtilizationRates, h)
    constraints = _try(nv.nvmlDeviceGetPowerManagementLimitConstraints, h)
    pci = _try(nv.nvmlDeviceGetPciInfo, h)
    procs = _try(nv.nvmlDeviceGetComputeRunningProcesses, h) or []
    cc = _try(nv.nvmlDeviceGetCudaComputeCapability, h)
    return GpuInfo(
        index=index,
        name=_text(nv.nvmlDeviceGetName(h)) or f"GPU {index}",
        uuid=_text(_try(nv.nvmlDeviceGetUUID, h)),
        pci_bus_id=_text(getattr(pci, "busId", None)),
        memory_total_bytes=int(mem.total),
        memory_free_bytes=int(mem.free),
        memory_used_bytes=int(mem.used),
        compute_capability=(int(cc[0]), int(cc[1])) if cc else None,
        power_limit_w=_watts(_try(nv.nvmlDeviceGetPowerManagementLimit, h)),
        power_default_limit_w=_watts(_try(nv.nvmlDeviceGetPowerManagementDefaultLimit, h)),
        power_max_limit_w=_watts(constraints[1]) if constraints else None,
        power_draw_w=_watts(_try(nv.nvmlDeviceGetPowerUsage, h)),
        temperature_c=_try(nv.nvmlDeviceGetTemperature, h, nv.NVML_TEMPERATURE_GPU),
        utilization_gpu_pct=getattr(util, "gpu", None),
        utilization_memory_pct=getattr(util, "memory", None),
        pcie_gen_current=_try(nv.nvmlDeviceGetCurrPcieLinkGeneration, h),
        pcie_gen_max=_try(nv.nvmlDeviceGetGpuMaxPcieLinkGeneration, h)
        or _try(nv.nvmlDeviceGetMaxPcieLinkGeneration, h),
        pcie_width_current=_try(nv.nvmlDeviceGetCurrPcieLinkWidth, h),
        pcie_width_max=_try(nv.nvmlDeviceGetMaxPcieLinkWidth, h),
        has_nvlink=_nvml_has_nvlink(nv, h),
        processes=tuple(
            ProcessInfo(
                pid=int(p.pid),
                used_memory_bytes=int(p.usedGpuMemory) if p.usedGpuMemory is not None else None,
                name=_process_name(int(p.pid)),
            )
            for p in procs
        ),
    )


def _nvml_has_nvlink(nv: Any, handle: Any) -> bool | None:
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


def detect() -> Detection:
    """Detect GPUs (NVML) and the CPU. Never raises: a machine without a usable GPU gets a CPU result."""
    cpu = detect_cpu()
    nv, why = _nvml()
    if nv is None:
        return build_detection((), cpu, reason=why)
    try:
        driver = _text(_try(nv.nvmlSystemGetDriverVersion))
        cuda = cuda_version_string(_try(nv.nvmlSystemGetCudaDriverVersion_v2))
        count = nv.nvmlDeviceGetCount()
        gpus = [_nvml_gpu(nv, i) for i in range(count)]
    except Exception as exc:
        log.warning("GPU detection failed: %s", exc)
        return build_detection((), cpu, reason=f"NVML query failed: {exc}")
    reason = None if gpus else "the NVIDIA driver is loaded but reports no GPU"
    return build_detection(gpus, cpu, driver_version=driver, cuda_version=cuda, reason=reason)


def sample_gpu_metrics() -> tuple[GpuSample, ...]:
    """Memory used, utilisation, temperature and power per GPU; () without NVML. Cheap enough to poll."""
    nv, _ = _nvml()
    if nv is None:
        return ()
    samples = []
    try:
        for i in range(nv.nvmlDeviceGetCount()):
            h = nv.nvmlDeviceGetHandleByIndex(i)
            mem = nv.nvmlDeviceGetMemoryInfo(h)
            util = _try(nv.nvmlDeviceGetUtilizationRates, h)
            samples.append(
                GpuSample(
                    index=i,
                    name=_text(nv.nvmlDeviceGetName(h)) or f"GPU {i}",
                    memory_used_bytes=int(mem.used),
                    memory_total_bytes=int(mem.total),
                    utilization_gpu_pct=getattr(util, "gpu", None),
                    temperature_c=_try(nv.nvmlDeviceGetTemperature, h, nv.NVML_TEMPERATURE_GPU),
                    power_draw_w=_watts(_try(nv.nvmlDeviceGetPowerUsage, h)),
                )
            )
    except Exception as exc:
        log.warning("GPU sampling failed: %s", exc)
        return ()
    return tuple(samples)
