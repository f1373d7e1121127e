"""GPU detection through NVML (nvidia-ml-py), matched to the card table; the CPU when there is no GPU.

NVML is read in `server/hardware/nvml.py` only; everything that turns its figures into a `Detection` (card
matching, unknown-card rows, GPU sets, /proc parsing) is pure and tested without a GPU. `detect()` never
raises: no library, no driver or no device gives `Detection(is_cpu_only=True, reason=...)`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict, Field

from server.hardware import nvml
from server.hardware.cards import Architecture, Card, GpuSet, Link, match_card
from server.hardware.cpu import CpuInfo, detect_cpu, parse_cpuinfo, parse_meminfo
from server.hardware.gpu_info import GpuInfo, GpuLink, GpuSample, ProcessInfo
from server.hardware.nvml import cuda_version_string

log = logging.getLogger(__name__)

# Re-exported: a Detection carries a CpuInfo and GpuInfos, and callers import them from here.
__all__ = [
    "CpuInfo", "GpuInfo", "GpuLink", "GpuSample", "ProcessInfo", "cuda_version_string", "detect_cpu",
    "parse_cpuinfo", "parse_meminfo",
]


class Detection(BaseModel):
    """What this machine offers: GPUs matched to a card (or the CPU only, with the reason)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    gpus: tuple[GpuInfo, ...] = ()
    links: tuple[GpuLink, ...] = Field(default=(), description="every pair of GPUs: topology, peer access")
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
    links: Sequence[GpuLink] = (),
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
        links=tuple(links),
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


# --- the edge: NVML (server/hardware/nvml.py) --------------------------------------------------


def detect() -> Detection:
    """Detect GPUs (NVML) and the CPU. Never raises: a machine without a usable GPU gets a CPU result."""
    cpu = detect_cpu()
    nv, why = nvml.nvml()
    if nv is None:
        return build_detection((), cpu, reason=why)
    try:
        reading = nvml.read_all(nv)
    except Exception as exc:
        log.warning("GPU detection failed: %s", exc)
        return build_detection((), cpu, reason=f"NVML query failed: {exc}")
    reason = None if reading.gpus else "the NVIDIA driver is loaded but reports no GPU"
    return build_detection(reading.gpus, cpu, links=reading.links, driver_version=reading.driver_version,
                           cuda_version=reading.cuda_version, reason=reason)


def sample_gpu_metrics() -> tuple[GpuSample, ...]:
    """Memory used, utilisation, temperature and power per GPU; () without NVML. Cheap enough to poll."""
    nv, _ = nvml.nvml()
    if nv is None:
        return ()
    try:
        return nvml.read_samples(nv)
    except Exception as exc:
        log.warning("GPU sampling failed: %s", exc)
        return ()
