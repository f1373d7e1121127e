"""What a plan or a budget is for: a set of identical GPUs, or the CPU.

`CpuTarget` is the one way to say "no GPU" (its card id is `cpu`); `Target` is either. `resolve_target` turns
`--card` and `--gpus` into one, detecting the machine only for `--card auto`.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from quantize.model.units import GIB
from server.hardware.cards import GpuSet, get_card

CPU_ID = "cpu"
# Host RAM assumed when the machine does not say (no /proc/meminfo and no sysconf).
FALLBACK_RAM_BYTES = 8 * GIB


class TargetError(ValueError):
    """--card / --gpus ask for something this machine does not have; the message says what."""


class CpuTarget(BaseModel):
    """No GPU: the model runs from system RAM."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    ram_bytes: int = Field(gt=0)

    @property
    def card_id(self) -> str:
        return CPU_ID

    @property
    def count(self) -> int:
        """GPUs in the target: none."""
        return 0

    @property
    def label(self) -> str:
        return f"cpu ({self.ram_bytes / GIB:.1f} GiB RAM)"


Target = GpuSet | CpuTarget


def cpu_target(ram_bytes: int | None = None) -> CpuTarget:
    """The CPU with `ram_bytes` of RAM (default: this machine's, else FALLBACK_RAM_BYTES)."""
    if ram_bytes is None:
        from server.hardware.cpu import detect_cpu

        ram_bytes = detect_cpu().total_ram_bytes
    return CpuTarget(ram_bytes=ram_bytes or FALLBACK_RAM_BYTES)


def resolve_target(card: str = "auto", gpus: int | None = None) -> Target:
    """--card auto|cpu|ID and --gpus N -> the target. `cpu` or --gpus 0 is the CPU; a card id needs no GPU
    here (a plan for another machine); `auto` detects (the CPU when there is no GPU). Raises TargetError or
    UnknownCardError (both ValueErrors) with a one-line message."""
    if gpus is not None and gpus < 0:
        raise TargetError(f"--gpus must be 0 (the CPU) or more, got {gpus}")
    key = card.strip().lower()
    if key == CPU_ID or gpus == 0:
        if gpus:
            raise TargetError(f"--gpus {gpus} needs a GPU card; --card cpu was given")
        return cpu_target()
    if key != "auto":
        return GpuSet.of(get_card(card), gpus or 1)
    from server.hardware.detect import detect, gpu_set_from_detection

    det = detect()
    found = gpu_set_from_detection(det)
    if found is None:
        if gpus:
            raise TargetError(f"--gpus {gpus} asked for but no GPU was found ({det.reason or 'no driver'})")
        return cpu_target(det.cpu.total_ram_bytes)
    if gpus is None:
        return found
    if gpus > found.count:
        raise TargetError(f"--gpus {gpus} but only {found.count} matching {found.card.id} GPU(s) here")
    return found.model_copy(update={"count": gpus})
