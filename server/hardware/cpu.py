"""The host CPU and RAM, from /proc where present (else os/platform): what the CPU path runs on."""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field


class CpuInfo(BaseModel):
    """The host CPU and RAM (from /proc where present, else os/platform)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model_name: str
    logical_cpus: int = Field(ge=1)
    usable_cpus: int = Field(ge=1, description="CPUs this process may run on (affinity)")
    physical_cores: int | None = None
    total_ram_bytes: int | None = None
    available_ram_bytes: int | None = None


def parse_cpuinfo(text: str) -> tuple[str | None, int | None]:
    """(model name, physical cores) from /proc/cpuinfo text; None where it does not say."""
    model: str | None = None
    cores: set[tuple[str, str]] = set()
    physical_id = "0"
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key, value = key.strip(), value.strip()
        if key in ("model name", "Model", "Hardware", "cpu model") and model is None and value:
            model = value
        elif key == "physical id":
            physical_id = value
        elif key == "core id":
            cores.add((physical_id, value))
    return model, (len(cores) or None)


def parse_meminfo(text: str) -> tuple[int | None, int | None]:
    """(MemTotal, MemAvailable) in bytes from /proc/meminfo text."""
    values: dict[str, int] = {}
    for line in text.splitlines():
        m = re.match(r"^(MemTotal|MemAvailable):\s+(\d+)\s*kB", line)
        if m:
            values[m.group(1)] = int(m.group(2)) * 1024
    return values.get("MemTotal"), values.get("MemAvailable")


def read_text(path: str) -> str:
    """A small text file (/proc), or "" when it cannot be read."""
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return ""


def detect_cpu() -> CpuInfo:
    """The host CPU and memory; never raises."""
    model, physical = parse_cpuinfo(read_text("/proc/cpuinfo"))
    total, available = parse_meminfo(read_text("/proc/meminfo"))
    if total is None:
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            total = None
    logical = os.cpu_count() or 1
    try:
        usable = len(os.sched_getaffinity(0)) or logical
    except AttributeError:  # not on Linux
        usable = logical
    return CpuInfo(
        model_name=model or platform.processor() or platform.machine() or "unknown CPU",
        logical_cpus=logical,
        usable_cpus=usable,
        physical_cores=physical,
        total_ram_bytes=total,
        available_ram_bytes=available,
    )
