"""Doctor checks of the GPUs themselves: idle, cool, free, alone, persistent, linked, unthrottled, powered.

Pure functions of a HostSnapshot's NVML-shaped data; a figure the card does not report gives a `skip`.
"""

from __future__ import annotations

from collections.abc import Iterator

from quantize.model.units import GIB
from server.hardware.gpu_info import GpuInfo, GpuLink
from server.ops.check import Check, DoctorLimits, failed, passed, skipped, warned
from server.ops.snapshot import HostSnapshot, NcclInstall

HOST_SETUP = "edgeserve host-setup"
# Reasons that mean the card protects itself (heat, power brake): work runs slower than it should.
HARDWARE_SLOWDOWNS = frozenset({"hw_slowdown", "hw_thermal_slowdown", "sw_thermal_slowdown",
                                "hw_power_brake_slowdown"})


def _gib(n: int | None) -> str:
    return "?" if n is None else f"{n / GIB:.1f} GiB"


def _is_idle(gpu: GpuInfo, limits: DoctorLimits) -> bool:
    return gpu.utilization_gpu_pct is not None and gpu.utilization_gpu_pct < limits.idle_utilization_pct


def utilization(gpu: GpuInfo, limits: DoctorLimits) -> Check:
    name, i = "gpu.utilization", gpu.index
    if gpu.utilization_gpu_pct is None:
        return skipped(name, "utilization not reported", gpu=i)
    if _is_idle(gpu, limits):
        return passed(name, f"{gpu.utilization_gpu_pct}% busy (idle)", gpu=i)
    return warned(name, f"{gpu.utilization_gpu_pct}% busy (idle is under {limits.idle_utilization_pct}%)",
                  "something else computes on it: benchmarks would be disturbed", gpu=i)


def temperature(gpu: GpuInfo, limits: DoctorLimits) -> Check:
    """Under 45 C when idle (warmer at idle: airflow or a hidden load); under load warn above 80, fail
    above 85 (seed 000's limits)."""
    name, i, t = "gpu.temperature", gpu.index, gpu.temperature_c
    if t is None:
        return skipped(name, "temperature not reported", gpu=i)
    if t > limits.fail_temperature_c:
        return failed(name, f"{t} C (over {limits.fail_temperature_c} C)",
                      "cool it down first: it will throttle; check airflow (a passive card needs chassis "
                      "fans)",
                      gpu=i)
    if t > limits.warn_temperature_c:
        return warned(name, f"{t} C (over {limits.warn_temperature_c} C)", "close to throttling", gpu=i)
    if _is_idle(gpu, limits) and t >= limits.idle_temperature_c:
        return warned(name, f"{t} C while idle (want under {limits.idle_temperature_c} C)",
                      "poor airflow or a load NVML does not show", gpu=i)
    return passed(name, f"{t} C", gpu=i)


def memory(gpu: GpuInfo, snapshot: HostSnapshot, limits: DoctorLimits) -> Check:
    """Free memory against what the plan expects on this GPU, or against a share of the card without one."""
    name, i = "gpu.memory", gpu.index
    free, total = gpu.memory_free_bytes, gpu.memory_total_bytes
    plan = snapshot.plan
    if plan is not None and plan.expected_bytes is not None and plan.gpus > i:
        seen = (f"{_gib(free)} free of {_gib(total)}; the {plan.backend} plan expects "
                f"{_gib(plan.expected_bytes)}")
        if free < plan.expected_bytes:
            return failed(name, seen, "free the GPU, or plan a smaller context / quantization "
                                      "(edgeserve plan)", gpu=i)
        return passed(name, seen, gpu=i)
    pct = 100 * free // total if total else 0
    seen = f"{_gib(free)} free of {_gib(total)} ({pct}%)"
    if pct < limits.min_free_memory_pct:
        return warned(name, seen, f"want {limits.min_free_memory_pct}% free before serving or benchmarking",
                      gpu=i)
    return passed(name, seen, gpu=i)


def processes(gpu: GpuInfo) -> Check:
    name, i = "gpu.processes", gpu.index
    if not gpu.processes:
        return passed(name, "no compute process", gpu=i)
    listed = ", ".join(
        f"{p.name or '?'} (pid {p.pid}{', ' + _gib(p.used_memory_bytes) if p.used_memory_bytes else ''})"
        for p in gpu.processes
    )
    return warned(name, f"{len(gpu.processes)} compute process(es): {listed}",
                  "stop them before serving or benchmarking", gpu=i)


def persistence(gpu: GpuInfo) -> Check:
    name, i = "gpu.persistence", gpu.index
    if gpu.persistence_mode is None:
        return skipped(name, "persistence mode not reported (not Linux, or not supported)", gpu=i)
    if gpu.persistence_mode:
        return passed(name, "persistence mode on", gpu=i)
    return warned(name, "persistence mode off: each CUDA start re-initialises the driver (seconds)",
                  f"{HOST_SETUP} (or nvidia-persistenced)", gpu=i)


def pcie(gpu: GpuInfo, limits: DoctorLimits) -> Check:
    """The link width must be the card's; a lower generation at idle is power saving, under load it is not."""
    name, i = "gpu.pcie", gpu.index
    gen, gen_max = gpu.pcie_gen_current, gpu.pcie_gen_max
    width, width_max = gpu.pcie_width_current, gpu.pcie_width_max
    if gen is None or gen_max is None or width is None or width_max is None:
        return skipped(name, "PCIe link not reported", gpu=i)
    seen = f"gen {gen} of {gen_max}, x{width} of x{width_max}"
    if width < width_max:
        return warned(name, seen, "the link runs narrower than the card supports: slot wiring, a riser or "
                                  "BIOS lane settings", gpu=i)
    if gen < gen_max and not _is_idle(gpu, limits):
        return warned(name, seen + " under load", "check the BIOS PCIe generation setting and the riser",
                      gpu=i)
    return passed(name, seen + (" (lower generation at idle is power saving)" if gen < gen_max else ""),
                  gpu=i)


def clocks(gpu: GpuInfo) -> Check:
    name, i = "gpu.clocks", gpu.index
    if gpu.clock_reasons is None:
        return skipped(name, "clock event reasons not reported", gpu=i)
    active = [r for r in gpu.clock_reasons if r != "gpu_idle"]
    if not active:
        return passed(name, "no throttling" + (" (idle)" if "gpu_idle" in gpu.clock_reasons else ""), gpu=i)
    hardware = sorted(set(active) & HARDWARE_SLOWDOWNS)
    if hardware:
        return failed(name, f"clocks held down by {', '.join(hardware)}",
                      "the card protects itself (heat or power delivery): fix cooling / power first", gpu=i)
    return warned(name, f"clocks held down by {', '.join(active)}",
                  "sw_power_cap: the power limit is reached (see gpu.power); applications_clocks_setting: "
                  f"clocks were set (reset with {HOST_SETUP} --reset-clocks)", gpu=i)


def power(gpu: GpuInfo) -> Check:
    name, i = "gpu.power", gpu.index
    limit, default, top = gpu.power_limit_w, gpu.power_default_limit_w, gpu.power_max_limit_w
    if limit is None:
        return skipped(name, "power limit not reported", gpu=i)
    seen = f"limit {limit:g} W (default {default or '?'} W, max {top or '?'} W)"
    if default is not None and limit < default:
        return warned(name, seen + ": lowered, decode speed drops with it",
                      f"{HOST_SETUP} --power-limit default (or max, with the cooling for it)", gpu=i)
    return passed(name, seen, gpu=i)


def ecc(gpu: GpuInfo) -> Check:
    name, i = "gpu.ecc", gpu.index
    if gpu.ecc_enabled is None:
        return skipped(name, "no ECC memory", gpu=i)
    if not gpu.ecc_enabled:
        return passed(name, "ECC supported but off (more memory, no error correction)", gpu=i)
    errors = gpu.ecc_uncorrected_errors or 0
    if errors:
        return failed(name, f"{errors} uncorrected ECC error(s) since the driver loaded",
                      "drain the card and reset it (nvidia-smi -r) or have it replaced", gpu=i)
    return passed(name, "ECC on, no uncorrected errors", gpu=i)


def peer_access(link: GpuLink) -> Check:
    name = f"gpus.peer_access.{link.a}-{link.b}"
    where = f"GPU {link.a} <-> GPU {link.b}"
    topo = f" (common ancestor: {link.topology})" if link.topology else ""
    if link.p2p_read is None:
        return skipped(name, f"{where}: peer access not reported{topo}")
    if link.p2p_read == "ok":
        return passed(name, f"{where}: peer reads work{topo}")
    return warned(name, f"{where}: no peer access ({link.p2p_read}){topo}",
                  "copies between the GPUs go through host memory: llama.cpp's layer split still works, "
                  "tensor parallel is slower; check IOMMU / ACS settings and the driver")


def nccl(install: NcclInstall | None) -> Check:
    name = "gpus.nccl"
    if install is None:
        return skipped(name, "NCCL not looked at")
    if install.version:
        return passed(name, f"NCCL {install.version} ({install.source})")
    return warned(name, f"NCCL not usable: {install.error or 'not found'}",
                  "SGLang tensor parallel needs NCCL (it comes with a CUDA build of torch); llama.cpp's "
                  "layer split does not")


def driver(snapshot: HostSnapshot) -> Check:
    det = snapshot.detection
    if det.is_cpu_only:
        return skipped("gpu.driver",
                       f"no NVIDIA GPU: {det.reason or 'none found'}; edgeserve serves on the CPU")
    names = ", ".join(sorted({g.name for g in det.gpus}))
    return passed("gpu.driver", f"{len(det.gpus)} GPU(s): {names}; driver {det.driver_version or '?'}, "
                                f"CUDA {det.cuda_version or '?'}")


def gpu_checks(snapshot: HostSnapshot, limits: DoctorLimits) -> Iterator[Check]:
    """Every check of the GPUs, GPU by GPU, then the links between them."""
    yield driver(snapshot)
    for gpu in snapshot.detection.gpus:
        yield utilization(gpu, limits)
        yield temperature(gpu, limits)
        yield memory(gpu, snapshot, limits)
        yield processes(gpu)
        yield persistence(gpu)
        yield pcie(gpu, limits)
        yield clocks(gpu)
        yield power(gpu)
        yield ecc(gpu)
    if len(snapshot.detection.gpus) > 1:
        yield from (peer_access(link) for link in snapshot.detection.links)
        yield nccl(snapshot.nccl)
