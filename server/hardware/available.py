"""Memory free right now, per device: what a backend about to allocate can really have.

The budget calculator sizes a plan against a card's capacity; this is the other half of the check, read at the
moment of starting: free VRAM per GPU through NVML (other processes hold some), or the kernel's MemAvailable
for the CPU. Reading is the side effect; the value is plain data.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class Available(BaseModel):
    """Free memory of one device at one moment."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    device: str = Field(description="'RAM' or 'GPU <index> (<name>)'")
    free_bytes: int = Field(ge=0)


def available_ram() -> Available | None:
    """MemAvailable of this host (None where /proc/meminfo does not say)."""
    from server.hardware.cpu import detect_cpu

    free = detect_cpu().available_ram_bytes
    return Available(device="RAM", free_bytes=free) if free is not None else None


def available_vram() -> tuple[Available, ...]:
    """Free memory of every GPU NVML sees (empty without a GPU or driver)."""
    from server.hardware.detect import detect

    return tuple(Available(device=f"GPU {g.index} ({g.name})", free_bytes=g.memory_free_bytes)
                 for g in detect().gpus)
