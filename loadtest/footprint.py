"""The memory a backend holds while it serves: GPU memory per process on GPUs, else resident memory.

GPU memory is read through NVML, per process, where the plan runs on GPUs; else VmRSS from /proc. A backend is
its whole process group (SGLang's scheduler processes, llama-server under a wrapper), so every member counts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from server.hardware.detect import detect
from server.launch.process import group_members

Kind = Literal["gpu", "rss"]


def group_pids(pid: int) -> list[int]:
    """The live members of the process group `pid` leads (the pid alone when /proc shows none)."""
    return group_members(pid) or [pid]


def rss_bytes(pids: list[int]) -> int:
    """Resident memory of these processes (shared pages count in each, as VmRSS does)."""
    total = 0
    for pid in pids:
        try:
            lines = Path(f"/proc/{pid}/status").read_text().splitlines()
        except OSError:  # exited meanwhile
            continue
        for line in lines:
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) * 1024
    return total


def gpu_bytes(pids: list[int], devices: int) -> int | None:
    """GPU memory NVML charges to these processes on the first `devices` GPUs; None when NVML shows none of
    them (no GPU, or a container whose pids NVML cannot see)."""
    wanted = set(pids)
    gpus = detect().gpus[:devices]
    found = [p.used_memory_bytes or 0 for g in gpus for p in g.processes if p.pid in wanted]
    return sum(found) if found else None


def gpu_used_bytes(devices: int) -> int:
    """Memory in use on the first `devices` GPUs, whoever holds it (the fallback: minus a baseline)."""
    return sum(g.memory_used_bytes for g in detect().gpus[:devices])


def memory_in_use(pid: int, gpus: int, baseline_bytes: int = 0) -> tuple[int, Kind]:
    """What the backend led by `pid` holds: GPU memory when `gpus` > 0, else RSS."""
    pids = group_pids(pid)
    if gpus > 0:
        held = gpu_bytes(pids, gpus)
        if held is None:
            held = max(0, gpu_used_bytes(gpus) - baseline_bytes)
        return held, "gpu"
    return rss_bytes(pids), "rss"
