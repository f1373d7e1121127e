"""`edgeserve host-setup` as a pure function: NVML figures and a request in, nvidia-smi commands out.

The request is what the operator asked for; the commands are exact, seed 001's host tuning done safely.

By default only persistence mode is turned on; power limits, clocks and the compute mode change only when
asked, and a value outside what NVML reports for that card (the power-limit range, the supported application
clocks, the card's top SM clock) is refused with the range. Nothing runs here: apply.py runs the commands.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from server.hardware.gpu_info import ComputeMode, GpuInfo

# nvidia-smi -c takes these names; EXCLUSIVE_THREAD is gone from current drivers.
COMPUTE_MODE_ARG: dict[ComputeMode, str] = {
    "default": "DEFAULT", "exclusive_process": "EXCLUSIVE_PROCESS", "prohibited": "PROHIBITED",
}
SETTABLE_COMPUTE_MODES = tuple(COMPUTE_MODE_ARG)
# nvmlDeviceSetGpuLockedClocks: "For Volta or newer fully supported devices" (NVML API reference).
LOCKED_CLOCKS_MIN_CC = (7, 0)
PowerTarget = Literal["default", "max"]
Setting = Literal["persistence", "power_limit", "locked_clocks", "applications_clocks", "compute_mode"]


class HostSetupRequest(BaseModel):
    """What the operator asked for; None leaves a setting as it is."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    gpus: tuple[int, ...] | None = Field(default=None, description="GPU indices; None: all")
    persistence: bool = Field(default=True, description="turn persistence mode on where it is off")
    power_limit_w: int | PowerTarget | None = None
    locked_clocks_mhz: tuple[int, int] | None = Field(default=None, description="(min, max) SM clock")
    applications_clocks_mhz: tuple[int, int] | None = Field(default=None, description="(memory, graphics)")
    reset_clocks: bool = False
    compute_mode: ComputeMode | None = None

    @model_validator(mode="after")
    def _check(self) -> HostSetupRequest:
        if self.locked_clocks_mhz is not None and self.locked_clocks_mhz[0] > self.locked_clocks_mhz[1]:
            raise ValueError("locked clocks: MIN is above MAX")
        if self.reset_clocks and (self.locked_clocks_mhz or self.applications_clocks_mhz):
            raise ValueError("reset the clocks or set them, not both")
        if self.compute_mode is not None and self.compute_mode not in COMPUTE_MODE_ARG:
            raise ValueError(f"compute mode {self.compute_mode}: settable are {', '.join(COMPUTE_MODE_ARG)}")
        return self


class Action(BaseModel):
    """One command that changes one setting of one GPU."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    gpu: int
    setting: Setting
    argv: tuple[str, ...]
    why: str

    @property
    def command(self) -> str:
        return " ".join(self.argv)


class Finding(BaseModel):
    """A setting left alone: already right, not supported, or refused (`refused`: the request was wrong)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    gpu: int | None
    setting: Setting | Literal["gpus"]
    detail: str
    refused: bool = False


class HostSetupPlan(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    actions: tuple[Action, ...] = ()
    findings: tuple[Finding, ...] = ()

    @property
    def refusals(self) -> tuple[Finding, ...]:
        return tuple(f for f in self.findings if f.refused)


def _smi(gpu: GpuInfo, *args: str) -> tuple[str, ...]:
    return ("nvidia-smi", "-i", str(gpu.index), *args)


def _watts(value: float) -> str:
    return f"{value:g}"


def _persistence(gpu: GpuInfo) -> Iterator[Action | Finding]:
    if gpu.persistence_mode is None:
        yield Finding(gpu=gpu.index, setting="persistence", detail="not reported: left alone")
    elif gpu.persistence_mode:
        yield Finding(gpu=gpu.index, setting="persistence", detail="already on")
    else:
        yield Action(gpu=gpu.index, setting="persistence", argv=_smi(gpu, "-pm", "1"),
                     why="keep the driver initialised between CUDA processes (nvidia-persistenced does the "
                         "same as a service)")


def _power(gpu: GpuInfo, wanted: int | PowerTarget) -> Iterator[Action | Finding]:
    low, high = gpu.power_min_limit_w, gpu.power_max_limit_w
    if low is None or high is None:
        yield Finding(gpu=gpu.index, setting="power_limit", refused=True,
                      detail="the card does not report its power-limit range: not changed")
        return
    if wanted == "default":
        if gpu.power_default_limit_w is None:
            yield Finding(gpu=gpu.index, setting="power_limit", refused=True,
                          detail="the card does not report its default power limit")
            return
        target = gpu.power_default_limit_w
    else:
        target = high if wanted == "max" else float(wanted)
    if not low <= target <= high:
        yield Finding(gpu=gpu.index, setting="power_limit", refused=True,
                      detail=f"{_watts(target)} W is outside GPU {gpu.index}'s range "
                             f"{_watts(low)}..{_watts(high)} W")
    elif gpu.power_limit_w == target:
        yield Finding(gpu=gpu.index, setting="power_limit", detail=f"already {_watts(target)} W")
    else:
        yield Action(gpu=gpu.index, setting="power_limit", argv=_smi(gpu, "-pl", _watts(target)),
                     why=f"board power limit {_watts(gpu.power_limit_w or 0)} -> {_watts(target)} W "
                         f"(range {_watts(low)}..{_watts(high)} W); lasts until reboot")


def _locked(gpu: GpuInfo, wanted: tuple[int, int]) -> Iterator[Action | Finding]:
    cc = gpu.compute_capability
    if cc is None or cc < LOCKED_CLOCKS_MIN_CC:
        yield Finding(gpu=gpu.index, setting="locked_clocks", refused=True,
                      detail="locked clocks need a Volta or newer card (CC 7.0+)")
        return
    top = gpu.clock_sm_max_mhz
    if top is not None and wanted[1] > top:
        yield Finding(gpu=gpu.index, setting="locked_clocks", refused=True,
                      detail=f"{wanted[1]} MHz is above GPU {gpu.index}'s top SM clock: range ..{top} MHz")
        return
    yield Action(gpu=gpu.index, setting="locked_clocks", argv=_smi(gpu, "-lgc", f"{wanted[0]},{wanted[1]}"),
                 why="SM clock held in a range: repeatable benchmarks; undo with --reset-clocks")


def _applications(gpu: GpuInfo, wanted: tuple[int, int]) -> Iterator[Action | Finding]:
    if not gpu.supported_clocks:
        yield Finding(gpu=gpu.index, setting="applications_clocks", refused=True,
                      detail="the card takes no application clocks (GeForce cards do not)")
        return
    memory, graphics = wanted
    options = {c.memory_mhz: c.graphics_mhz for c in gpu.supported_clocks}
    if memory not in options:
        yield Finding(gpu=gpu.index, setting="applications_clocks", refused=True,
                      detail=f"memory clock {memory} MHz is not supported; supported: "
                             f"{', '.join(str(m) for m in sorted(options))} MHz")
        return
    allowed = options[memory]
    if graphics not in allowed:
        span = f"{min(allowed)}..{max(allowed)} MHz ({len(allowed)} steps)" if allowed else "none"
        yield Finding(gpu=gpu.index, setting="applications_clocks", refused=True,
                      detail=f"graphics clock {graphics} MHz is not supported with memory at {memory} MHz; "
                             f"supported: {span}")
        return
    if gpu.applications_clocks_mhz == wanted:
        yield Finding(gpu=gpu.index, setting="applications_clocks", detail=f"already {memory},{graphics} MHz")
        return
    yield Action(gpu=gpu.index, setting="applications_clocks", argv=_smi(gpu, "-ac", f"{memory},{graphics}"),
                 why="application clocks (memory, graphics) for compute work; undo with --reset-clocks")


def _reset(gpu: GpuInfo) -> Iterator[Action | Finding]:
    cc = gpu.compute_capability
    if cc is not None and cc >= LOCKED_CLOCKS_MIN_CC:
        yield Action(gpu=gpu.index, setting="locked_clocks", argv=_smi(gpu, "-rgc"),
                     why="release locked SM clocks")
    if gpu.supported_clocks:
        yield Action(gpu=gpu.index, setting="applications_clocks", argv=_smi(gpu, "-rac"),
                     why="application clocks back to the card's defaults")


def _compute_mode(gpu: GpuInfo, wanted: ComputeMode) -> Iterator[Action | Finding]:
    if gpu.compute_mode is None:
        yield Finding(gpu=gpu.index, setting="compute_mode", refused=True,
                      detail="the card does not report a compute mode")
    elif gpu.compute_mode == wanted:
        yield Finding(gpu=gpu.index, setting="compute_mode", detail=f"already {wanted}")
    else:
        yield Action(gpu=gpu.index, setting="compute_mode", argv=_smi(gpu, "-c", COMPUTE_MODE_ARG[wanted]),
                     why=f"{gpu.compute_mode} -> {wanted}" + (
                         ": one process per GPU (a second server on it fails to start)"
                         if wanted == "exclusive_process" else ""))


def _per_gpu(gpu: GpuInfo, request: HostSetupRequest) -> Iterator[Action | Finding]:
    if request.persistence:
        yield from _persistence(gpu)
    if request.power_limit_w is not None:
        yield from _power(gpu, request.power_limit_w)
    if request.reset_clocks:
        yield from _reset(gpu)
    if request.locked_clocks_mhz is not None:
        yield from _locked(gpu, request.locked_clocks_mhz)
    if request.applications_clocks_mhz is not None:
        yield from _applications(gpu, request.applications_clocks_mhz)
    if request.compute_mode is not None:
        yield from _compute_mode(gpu, request.compute_mode)


def plan_host_setup(gpus: Sequence[GpuInfo], request: HostSetupRequest) -> HostSetupPlan:
    """The commands that bring the selected GPUs where the request wants them, and what was left alone."""
    present = {g.index: g for g in gpus}
    wanted = request.gpus if request.gpus is not None else tuple(present)
    missing = [i for i in wanted if i not in present]
    if missing:
        here = ", ".join(str(i) for i in sorted(present)) or "none"
        return HostSetupPlan(findings=(Finding(
            gpu=None, setting="gpus", refused=True,
            detail=f"no GPU {', '.join(str(i) for i in missing)} here (GPUs: {here})"),))
    actions: list[Action] = []
    findings: list[Finding] = []
    for index in wanted:
        for item in _per_gpu(present[index], request):
            if isinstance(item, Action):
                actions.append(item)
            else:
                findings.append(item)
    return HostSetupPlan(actions=tuple(actions), findings=tuple(findings))
