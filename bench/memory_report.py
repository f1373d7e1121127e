"""The pure parts of bench/memory_accuracy.py: parsing llama-server's and nvidia-smi's output, the table."""

from __future__ import annotations

import re
from dataclasses import dataclass, field


@dataclass
class Result:
    config: str
    predicted_mib: float
    measured_idle_mib: float | None = None
    measured_loaded_mib: float | None = None
    error_idle_pct: float | None = None
    error_loaded_pct: float | None = None
    predicted: dict[str, float] = field(default_factory=dict)
    logged: dict[str, float] = field(default_factory=dict)
    observed_overhead_mib: float | None = None
    method: str = ""
    startup_s: float | None = None
    error: str | None = None
    load_error: str | None = None


CUDA_DEVICES = r"CUDA\d+"


def parse_buffer_log(text: str, devices: str = CUDA_DEVICES) -> dict[str, float]:
    """llama.cpp's buffer sizes by kind (model, KV, compute), MiB, summed over the devices matching
    `devices` (a regex; default the CUDA devices, `CPU` for a CPU run).

    Model and KV lines add up (an iSWA model logs two KV caches); sched_reserve may log compute more than
    once: the last wins."""
    pattern = re.compile(rf"\b({devices})\s+(model|KV|compute) buffer size =\s+([0-9.]+) MiB")
    sums: dict[tuple[str, str], float] = {}
    for dev, kind, mib in pattern.findall(text):
        key = (dev, kind)
        sums[key] = float(mib) if kind == "compute" else sums.get(key, 0.0) + float(mib)
    out: dict[str, float] = {}
    for (_, kind), mib in sums.items():
        out[kind] = out.get(kind, 0.0) + mib
    return out


def parse_compute_apps(csv_text: str) -> dict[int, float]:
    """`nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits` -> {pid: MiB}."""
    out: dict[int, float] = {}
    for line in csv_text.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) >= 2 and parts[0].isdigit():
            try:
                out[int(parts[0])] = float(parts[1])
            except ValueError:
                continue
    return out


def error_pct(predicted: float, measured: float | None) -> float | None:
    return None if measured is None or measured <= 0 else round(100.0 * (predicted - measured) / measured, 2)


def fmt_num(v: float | None, digits: int = 0) -> str:
    return "-" if v is None else f"{v:,.{digits}f}"


def render_table(results: list[Result], gpu_name: str) -> str:
    lines = [
        f"GPU: {gpu_name}. Predicted: `edgeserve plan` total for llama-server; measured: nvidia-smi "
        "used_memory "
        "of the llama-server process after /health (idle) and after one long request (loaded).",
        "",
        "| config | predicted MiB | measured MiB idle | error % | measured MiB loaded | error % "
        "| weights pred/log | KV pred/log | compute pred/log | overhead pred/obs |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        if r.error:
            lines.append(f"| {r.config} | {fmt_num(r.predicted_mib)} | failed: {r.error} | | | | | | | |")
            continue
        p, lg = r.predicted, r.logged
        lines.append(
            f"| {r.config} | {fmt_num(r.predicted_mib)} | {fmt_num(r.measured_idle_mib)} "
            f"| {fmt_num(r.error_idle_pct, 1)} "
            f"| {fmt_num(r.measured_loaded_mib)} | {fmt_num(r.error_loaded_pct, 1)} "
            f"| {fmt_num(p.get('weights'))}/{fmt_num(lg.get('model'))} "
            f"| {fmt_num(p.get('kv'))}/{fmt_num(lg.get('KV'))} "
            f"| {fmt_num(p.get('compute'))}/{fmt_num(lg.get('compute'))} "
            f"| {fmt_num(p.get('overhead'))}/{fmt_num(r.observed_overhead_mib)} |"
        )
    errs = [abs(e) for r in results for e in (r.error_idle_pct, r.error_loaded_pct) if e is not None]
    if errs:
        lines += ["", f"max |error|: {max(errs):.1f}%; within 3%: {sum(e <= 3 for e in errs)}/{len(errs)}"]
    cal = calibration(results)
    if cal is not None:
        lines += [
            "observed CUDA/runtime overhead (measured idle - llama.cpp buffers): median "
            f"{cal['median_mib']:.0f} "
            f"MiB over {cal['n']} runs (predicted {cal['predicted_mib']:.0f}); with it the errors would be "
            f"max {cal['max_abs_error_pct']:.1f}% idle."
        ]
    return "\n".join(lines)


def calibration(results: list[Result]) -> dict[str, float] | None:
    """The overhead a fitted constant would give, and the errors with it (for recalibrating budget_llama)."""
    ok = [r for r in results if r.observed_overhead_mib is not None and r.measured_idle_mib]
    if not ok:
        return None
    obs = sorted(r.observed_overhead_mib for r in ok if r.observed_overhead_mib is not None)
    median = obs[len(obs) // 2]
    errs = []
    for r in ok:
        fixed = r.predicted_mib - r.predicted.get("overhead", 0.0) + median
        e = error_pct(fixed, r.measured_idle_mib)
        if e is not None:
            errs.append(abs(e))
    return {"median_mib": median, "n": len(ok), "predicted_mib": ok[0].predicted.get("overhead", 0.0),
            "max_abs_error_pct": max(errs) if errs else 0.0}  # fmt: skip
