"""The NVML edge maps what nvidia-ml-py returns into GpuInfo / GpuLink. There is no GPU here, so the module
handed to it answers like pynvml does for two Tesla P4s (the values and errors pynvml's functions return:
milliwatts, enum integers, bit masks, NVMLError_NotSupported for what a card lacks)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pynvml
import pytest

from server.hardware import nvml

MIB = 1 << 20


class FakeNvml:
    """The pynvml functions server/hardware/nvml.py calls, with pynvml's return shapes."""

    NVML_TEMPERATURE_GPU = pynvml.NVML_TEMPERATURE_GPU
    NVML_NVLINK_MAX_LINKS = pynvml.NVML_NVLINK_MAX_LINKS
    NVML_FEATURE_ENABLED = pynvml.NVML_FEATURE_ENABLED

    def __init__(self) -> None:
        self.p2p_indices: list[Any] = []

    @staticmethod
    def _unsupported() -> pynvml.NVMLError:
        return pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)

    def nvmlSystemGetDriverVersion(self) -> str:
        return "570.133.20"

    def nvmlSystemGetCudaDriverVersion_v2(self) -> int:
        return 12080

    def nvmlDeviceGetCount(self) -> int:
        return 2

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetName(self, h: int) -> str:
        return "Tesla P4"

    def nvmlDeviceGetUUID(self, h: int) -> str:
        return f"GPU-{h}"

    def nvmlDeviceGetPciInfo(self, h: int) -> Any:
        return SimpleNamespace(busId=f"00000000:3B:0{h}.0")

    def nvmlDeviceGetMemoryInfo(self, h: int) -> Any:
        return SimpleNamespace(total=7680 * MIB, free=7600 * MIB, used=80 * MIB)

    def nvmlDeviceGetUtilizationRates(self, h: int) -> Any:
        return SimpleNamespace(gpu=3, memory=1)

    def nvmlDeviceGetPowerManagementLimitConstraints(self, h: int) -> list[int]:
        return [60000, 75000]

    def nvmlDeviceGetPowerManagementLimit(self, h: int) -> int:
        return 70000

    def nvmlDeviceGetPowerManagementDefaultLimit(self, h: int) -> int:
        return 75000

    def nvmlDeviceGetPowerUsage(self, h: int) -> int:
        return 6543

    def nvmlDeviceGetTemperature(self, h: int, sensor: int) -> int:
        return 36

    def nvmlDeviceGetComputeRunningProcesses(self, h: int) -> list[Any]:
        return [SimpleNamespace(pid=999999, usedGpuMemory=512 * MIB)] if h == 1 else []

    def nvmlDeviceGetCudaComputeCapability(self, h: int) -> tuple[int, int]:
        return (6, 1)

    def nvmlDeviceGetCurrPcieLinkGeneration(self, h: int) -> int:
        return 3

    def nvmlDeviceGetGpuMaxPcieLinkGeneration(self, h: int) -> int:
        return 3

    def nvmlDeviceGetMaxPcieLinkGeneration(self, h: int) -> int:
        return 3

    def nvmlDeviceGetCurrPcieLinkWidth(self, h: int) -> int:
        return 8 if h == 1 else 16

    def nvmlDeviceGetMaxPcieLinkWidth(self, h: int) -> int:
        return 16

    def nvmlDeviceGetNvLinkState(self, h: int, link: int) -> int:
        raise self._unsupported()

    def nvmlDeviceGetPersistenceMode(self, h: int) -> int:
        return pynvml.NVML_FEATURE_DISABLED if h == 1 else pynvml.NVML_FEATURE_ENABLED

    def nvmlDeviceGetComputeMode(self, h: int) -> int:
        return pynvml.NVML_COMPUTEMODE_EXCLUSIVE_PROCESS

    def nvmlDeviceGetCurrentClocksEventReasons(self, h: int) -> int:
        return pynvml.nvmlClocksEventReasonGpuIdle | pynvml.nvmlClocksEventReasonSwPowerCap

    def nvmlDeviceGetClockInfo(self, h: int, kind: int) -> int:
        return {pynvml.NVML_CLOCK_SM: 455, pynvml.NVML_CLOCK_MEM: 405}[kind]

    def nvmlDeviceGetMaxClockInfo(self, h: int, kind: int) -> int:
        return {pynvml.NVML_CLOCK_SM: 1531, pynvml.NVML_CLOCK_MEM: 3003}[kind]

    def nvmlDeviceGetApplicationsClock(self, h: int, kind: int) -> int:
        return {pynvml.NVML_CLOCK_SM: 885, pynvml.NVML_CLOCK_MEM: 3003}[kind]

    def nvmlDeviceGetSupportedMemoryClocks(self, h: int) -> list[int]:
        return [405, 3003]

    def nvmlDeviceGetSupportedGraphicsClocks(self, h: int, mem: int) -> list[int]:
        return [1531, 885, 455] if mem == 3003 else [455]

    def nvmlDeviceGetEccMode(self, h: int) -> list[int]:
        return [1, 1]

    def nvmlDeviceGetTotalEccErrors(self, h: int, error_type: int, counter: int) -> int:
        assert (error_type, counter) == (pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, pynvml.NVML_VOLATILE_ECC)
        return 2 if h == 1 else 0

    def nvmlDeviceGetTopologyCommonAncestor(self, a: int, b: int) -> int:
        return pynvml.NVML_TOPOLOGY_HOSTBRIDGE

    def nvmlDeviceGetP2PStatus(self, a: int, b: int, index: Any) -> int:
        self.p2p_indices.append(index)
        return pynvml.NVML_P2P_STATUS_CHIPSET_NOT_SUPPORTED


def test_read_all_maps_pynvml_values() -> None:
    fake = FakeNvml()
    reading = nvml.read_all(fake)
    assert reading.driver_version == "570.133.20" and reading.cuda_version == "12.8"
    first, second = reading.gpus
    assert first.power_limit_w == 70.0 and first.power_min_limit_w == 60.0 and first.power_max_limit_w == 75.0
    assert first.power_draw_w == 6.5
    assert first.persistence_mode is True and second.persistence_mode is False
    assert first.compute_mode == "exclusive_process"
    assert first.clock_reasons == ("gpu_idle", "sw_power_cap")
    assert (first.clock_sm_mhz, first.clock_sm_max_mhz, first.clock_memory_max_mhz) == (455, 1531, 3003)
    assert first.applications_clocks_mhz == (3003, 885)
    assert [(c.memory_mhz, c.graphics_mhz) for c in first.supported_clocks] == [
        (3003, (455, 885, 1531)), (405, (455,))]
    assert (first.ecc_enabled, first.ecc_uncorrected_errors) == (True, 0)
    assert second.ecc_uncorrected_errors == 2
    assert first.has_nvlink is None  # NOT_SUPPORTED on the first link: no NVLink at all
    assert second.pcie_width_current == 8
    assert second.processes[0].pid == 999999 and second.processes[0].used_memory_bytes == 512 * MIB
    (link,) = reading.links
    assert (link.a, link.b, link.topology, link.p2p_read) == (0, 1, "hostbridge", "chipset_not_supported")
    # pynvml's NVML_P2P_CAPS_INDEX_READ is the tuple (0,); the edge passes nvml.h's integer.
    assert fake.p2p_indices == [0]


def test_unsupported_queries_become_none() -> None:
    class Bare(FakeNvml):
        def __getattribute__(self, name: str) -> Any:
            required = {"nvmlDeviceGetHandleByIndex", "nvmlDeviceGetMemoryInfo", "nvmlDeviceGetName",
                        "nvmlDeviceGetCount", "_unsupported"}
            if name.startswith("nvml") and name not in required:
                def unsupported(*_: Any) -> Any:
                    raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
                return unsupported
            return super().__getattribute__(name)

    reading = nvml.read_all(Bare())
    gpu = reading.gpus[0]
    assert gpu.name == "Tesla P4" and gpu.memory_total_bytes == 7680 * MIB
    assert gpu.persistence_mode is None and gpu.clock_reasons is None and gpu.ecc_enabled is None
    assert gpu.supported_clocks == () and gpu.power_min_limit_w is None
    assert reading.links[0].p2p_read is None and reading.driver_version is None


@pytest.mark.parametrize(("mask", "names"), [(0, ()), (0x1, ("gpu_idle",)),
                                             (0x48, ("hw_slowdown", "hw_thermal_slowdown"))])
def test_clock_reason_masks(mask: int, names: tuple[str, ...]) -> None:
    assert nvml.clock_reasons(mask) == names
    assert nvml.clock_reasons(None) is None
