"""Doctor checks that hold with or without a GPU: the plan, CPU cores, RAM, disk for models, free ports."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from quantize.model.units import GIB
from server.ops.check import Check, DoctorLimits, failed, passed, skipped, warned
from server.ops.snapshot import HostSnapshot, PortState


def _gib(n: int | None) -> str:
    return "?" if n is None else f"{n / GIB:.1f} GiB"


def plan(snapshot: HostSnapshot) -> Check:
    name, p = "plan", snapshot.plan
    if p is None:
        return skipped(name, "no plan asked for")
    if p.error:
        return failed(name, f"no plan for this machine: {p.error}",
                      "edgeserve plan / edgeserve launch --dry-run show what fits")
    where = f"{p.card} x{p.gpus}" if p.gpus else "the CPU"
    expects = ""
    if p.expected_bytes:
        expects = f", expects {_gib(p.expected_bytes)} {'per GPU' if p.gpus else 'of RAM'}"
    model = Path(p.model_path).name if p.model_path else "?"
    return passed(name, f"{p.backend} on {where}: n_ctx {p.n_ctx} x n_parallel {p.n_parallel}, "
                        f"{model}{expects}")


def cpus(snapshot: HostSnapshot, limits: DoctorLimits) -> Check:
    cpu = snapshot.detection.cpu
    seen = (f"{cpu.usable_cpus} usable CPU(s) of {cpu.logical_cpus} ({cpu.physical_cores or '?'} cores): "
            f"{cpu.model_name}")
    if cpu.usable_cpus < limits.min_cpus:
        return warned("host.cpus", seen, "one CPU serializes the gateway and llama.cpp: expect slow answers")
    return passed("host.cpus", seen)


def ram(snapshot: HostSnapshot) -> Check:
    """On the CPU the plan's memory must fit the available RAM; with GPUs the model is read through RAM."""
    name, cpu, p = "host.memory", snapshot.detection.cpu, snapshot.plan
    available = cpu.available_ram_bytes
    if available is None:
        return skipped(name, "available RAM not reported")
    seen = f"{_gib(available)} available of {_gib(cpu.total_ram_bytes)}"
    if p is not None and p.gpus == 0 and p.expected_bytes is not None:
        seen += f"; the plan expects {_gib(p.expected_bytes)}"
        if p.expected_bytes > available:
            return failed(name, seen, "plan a smaller context or model, or free memory")
    elif p is not None and p.model_bytes is not None and p.model_bytes > available:
        return warned(name, f"{seen}; the model file is {_gib(p.model_bytes)}",
                      "loading reads it through the page cache: start-up will be slow")
    return passed(name, seen)


def disk(snapshot: HostSnapshot, limits: DoctorLimits) -> Check:
    name, d = "host.disk", snapshot.disk
    if d is None:
        return skipped(name, "disk space not looked at")
    seen = f"{_gib(d.free_bytes)} free of {_gib(d.total_bytes)} in {d.path}"
    if d.free_bytes < limits.min_disk_gib * GIB:
        return warned(name, seen, f"want {limits.min_disk_gib} GiB for models and their quantizations")
    return passed(name, seen)


def port(state: PortState) -> Check:
    name = f"host.port.{state.port}"
    where = f"{state.host}:{state.port} ({state.role})"
    if state.error:
        return warned(name, f"{where}: {state.error}")
    if state.in_use:
        return failed(name, f"{where} is in use", "stop what listens there, or pick another --port")
    return passed(name, f"{where} is free")


def host_checks(snapshot: HostSnapshot, limits: DoctorLimits) -> Iterator[Check]:
    yield plan(snapshot)
    yield cpus(snapshot, limits)
    yield ram(snapshot)
    yield disk(snapshot, limits)
    yield from (port(p) for p in snapshot.ports)
