"""What NVML says about the GPUs, as frozen values: one device, a pair of devices, a cheap sample.

`server/hardware/nvml.py` fills them (the only module that touches NVML); detection, `edgeserve gpu`,
`edgeserve doctor` and `edgeserve host-setup` read them, so each can be tested with NVML-shaped data alone.
Optional figures are None where the device or the driver does not report them.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

ComputeMode = Literal["default", "exclusive_thread", "prohibited", "exclusive_process"]
# NVML's clock event ("throttle") reasons by their nvidia-smi names, lower case.
ClockReason = Literal[
    "gpu_idle",
    "applications_clocks_setting",
    "sw_power_cap",
    "hw_slowdown",
    "sync_boost",
    "sw_thermal_slowdown",
    "hw_thermal_slowdown",
    "hw_power_brake_slowdown",
    "display_clock_setting",
]
# nvmlDeviceGetTopologyCommonAncestor, closest first; nvidia-smi topo -m prints them as PIX, PXB, PHB, ...
TopologyLevel = Literal["internal", "single", "multiple", "hostbridge", "node", "system"]
P2PStatus = Literal[
    "ok", "chipset_not_supported", "gpu_not_supported", "ioh_topology_not_supported", "disabled_by_regkey",
    "not_supported", "unknown",
]


class ProcessInfo(BaseModel):
    """A compute process on a GPU."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    pid: int
    used_memory_bytes: int | None = None
    name: str | None = None


class SupportedClocks(BaseModel):
    """One memory clock the card supports and the graphics clocks allowed with it (application clocks)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    memory_mhz: int = Field(gt=0)
    graphics_mhz: tuple[int, ...] = ()


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
    power_min_limit_w: float | None = None
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
    persistence_mode: bool | None = None
    compute_mode: ComputeMode | None = None
    clock_reasons: tuple[ClockReason, ...] | None = Field(
        default=None, description="why the clocks are held down right now; None: not reported"
    )
    clock_sm_mhz: int | None = None
    clock_sm_max_mhz: int | None = None
    clock_memory_max_mhz: int | None = None
    applications_clocks_mhz: tuple[int, int] | None = Field(
        default=None, description="(memory, graphics) application clocks in force"
    )
    supported_clocks: tuple[SupportedClocks, ...] = Field(
        default=(), description="application-clock pairs the card accepts; empty: it takes none (GeForce)"
    )
    ecc_enabled: bool | None = Field(default=None, description="None: the card has no ECC memory")
    ecc_uncorrected_errors: int | None = Field(default=None, description="since the driver loaded")
    processes: tuple[ProcessInfo, ...] = ()
    card_id: str | None = Field(default=None, description="the matched table row; None for a card not in it")


class GpuLink(BaseModel):
    """How two GPUs reach each other: the closest common PCIe ancestor and whether peer reads work."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    a: int = Field(ge=0)
    b: int = Field(ge=0)
    topology: TopologyLevel | None = None
    p2p_read: P2PStatus | None = None


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
