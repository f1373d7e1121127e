"""Decode speed under a lowered power limit: set each limit with the command `edgeserve host-setup` prints
(inside NVML's range for the card), run llama-bench, and put the limit back as it was, whatever happens."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from experiments import Sizes, power_run
from llama_bench import BenchOutput, run_llama_bench

from server.hardware.detect import detect
from server.hardware.gpu_info import GpuInfo
from server.ops.apply import apply_actions
from server.ops.host_setup import HostSetupRequest, plan_host_setup

# Shares of the default limit tried, highest first (clamped to the card's range).
STEPS = (1.0, 0.75, 0.5)


@dataclass(frozen=True)
class PowerResult:
    limits: tuple[float, ...]
    outputs: tuple[BenchOutput, ...]
    refused: str | None = None


def power_limits(gpu: GpuInfo, steps: tuple[float, ...] = STEPS) -> tuple[float, ...]:
    """Whole-watt limits from the default down, inside [min, max]; () when the card reports no range."""
    base = gpu.power_default_limit_w or gpu.power_limit_w
    low, high = gpu.power_min_limit_w, gpu.power_max_limit_w
    if base is None or low is None or high is None:
        return ()
    limits = sorted({float(round(min(max(base * s, low), high))) for s in steps}, reverse=True)
    return tuple(limits)


def set_limit(gpu: GpuInfo, watts: float) -> str | None:
    """None when the limit is in force, else why not (out of range, no permission, ...)."""
    plan = plan_host_setup([gpu], HostSetupRequest(gpus=(gpu.index,), persistence=False,
                                                   power_limit_w=int(watts)))
    if plan.refusals:
        return "; ".join(f.detail for f in plan.refusals)
    failed = [r for r in apply_actions(plan.actions) if not r.ok]
    return f"{failed[0].action.command}: {failed[0].output}" if failed else None


def run_power(binary: str, model: Path, sizes: Sizes, gpu_index: int) -> PowerResult:
    det = detect()
    gpus = [g for g in det.gpus if g.index == gpu_index]
    if not gpus:
        return PowerResult((), (), refused=f"no GPU {gpu_index} ({det.reason or 'NVML sees none'})")
    gpu = gpus[0]
    limits = power_limits(gpu)
    if len(limits) < 2:
        return PowerResult((), (), refused="the card reports no power-limit range to step through")
    if os.geteuid() != 0:
        return PowerResult((), (), refused="changing the power limit needs root")
    original = gpu.power_limit_w
    outputs = []
    try:
        for watts in limits:
            why = set_limit(gpu, watts)
            if why:
                return PowerResult((), tuple(outputs), refused=why)
            outputs.append(run_llama_bench(binary, model, power_run(sizes, watts)))
    finally:
        if original is not None:
            set_limit(gpu, original)
    return PowerResult(limits, tuple(outputs))
