"""Tuning reports: a markdown table and a PNG (tokens/s and TTFT p95 against n_parallel, one line per
n_ctx)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI

import matplotlib.pyplot as plt
from pydantic import BaseModel, ConfigDict

from loadtest.selection import Choice, Constraint, Trial
from loadtest.workload import Workload
from quantize.model.units import MIB


class ReportFiles(BaseModel):
    model_config = ConfigDict(frozen=True)

    markdown: Path
    plot: Path


def _num(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def markdown_table(trials: Sequence[Trial], choice: Choice) -> str:
    """One row per trial; the chosen one is marked, the others say why they were not feasible."""
    header = ("| n_parallel | n_ctx | requests ok | failed | error rate | tokens/s | requests/s "
              "| TTFT p50 ms | TTFT p95 ms | latency p95 ms | stream tokens/s p50 | GPU MiB | host load "
              "| verdict |")
    rule = "|" + "---:|" * 13 + "---|"
    rows = [header, rule]
    reasons = {v.setting: v for v in choice.verdicts}
    for trial in trials:
        s = trial.summary
        verdict = reasons.get(trial.setting)
        if choice.best is not None and choice.best.setting == trial.setting:
            note = "**chosen**"
        elif verdict is not None and not verdict.is_feasible:
            note = "; ".join(verdict.reasons).replace("|", "/").replace("\n", " ")[:160]
        else:
            note = "ok"
        gpu = None if trial.gpu_memory_used_bytes is None else trial.gpu_memory_used_bytes / MIB
        if s is None:
            cells = ["-"] * 9
        else:
            cells = [str(s.requests_ok), str(s.requests_failed), f"{s.error_rate:.1%}",
                     _num(s.tokens_per_s, 1), _num(s.requests_per_s, 2), _num(s.ttft_p50_ms),
                     _num(s.ttft_p95_ms), _num(s.e2e_p95_ms), _num(s.decode_tokens_per_s_p50, 1)]
        setting = [str(trial.setting.n_parallel), str(trial.setting.n_ctx)]
        row = [*setting, *cells, _num(gpu), _num(trial.host_load_1m, 1), note]
        rows.append("| " + " | ".join(row) + " |")
    return "\n".join(rows)


def describe_run(workload: Workload, users: int, duration_s: int, constraint: Constraint) -> str:
    """The conditions in one paragraph, so a table is never read without them."""
    latency = ("no TTFT limit" if constraint.max_ttft_p95_ms is None
               else f"TTFT p95 <= {constraint.max_ttft_p95_ms:.0f} ms")
    mode = "streaming" if workload.stream else "non-streaming"
    eos = ", ignore_eos" if workload.ignore_eos else ""
    return (f"Workload: {users} concurrent users (closed loop) for {duration_s} s per setting, {mode} "
            f"chat completions, prompt about {workload.prompt_tokens} tokens, max_tokens "
            f"{workload.max_tokens}{eos}. Constraint: {latency}, error rate <= "
            f"{constraint.max_error_rate:.1%}. tokens/s is the aggregate generation rate over the run; "
            "stream tokens/s is what one client sees after its first token; host load is the 1-minute load "
            "average when the setting's server started (it still carries the previous setting's run for "
            "about a minute; far above the number of cores means other work competed).")


def plot(trials: Sequence[Trial], choice: Choice, constraint: Constraint, path: Path, title: str) -> Path:
    """Two panels sharing the --parallel axis: aggregate tokens/s and TTFT p95."""
    measured = [t for t in trials if t.summary is not None]
    fig, (ax_tps, ax_ttft) = plt.subplots(1, 2, figsize=(11, 4.2))
    try:
        for n_ctx in sorted({t.setting.n_ctx for t in measured}):
            line = sorted((t for t in measured if t.setting.n_ctx == n_ctx),
                          key=lambda t: t.setting.n_parallel)
            xs = [t.setting.n_parallel for t in line]
            tps = [t.summary.tokens_per_s if t.summary else 0.0 for t in line]
            ttft = [(t.summary.ttft_p95_ms if t.summary else None) for t in line]
            ax_tps.plot(xs, tps, marker="o", label=f"n_ctx {n_ctx}")
            pts = [(x, y) for x, y in zip(xs, ttft, strict=True) if y is not None]
            if pts:
                ax_ttft.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"n_ctx {n_ctx}")
        best = choice.best
        if best is not None and best.summary is not None:
            ax_tps.plot([best.setting.n_parallel], [best.summary.tokens_per_s], marker="*", markersize=16,
                        color="gold", markeredgecolor="black", linestyle="none", label="chosen")
            if best.summary.ttft_p95_ms is not None:
                ax_ttft.plot([best.setting.n_parallel], [best.summary.ttft_p95_ms], marker="*", markersize=16,
                             color="gold", markeredgecolor="black", linestyle="none", label="chosen")
        if constraint.max_ttft_p95_ms is not None:
            ax_ttft.axhline(constraint.max_ttft_p95_ms, color="red", linestyle="--", label="TTFT p95 limit")
        parallels = sorted({t.setting.n_parallel for t in trials})
        for ax, ylabel in ((ax_tps, "generated tokens/s (all users)"), (ax_ttft, "TTFT p95 (ms)")):
            if parallels and max(parallels) / max(1, min(parallels)) >= 4:
                ax.set_xscale("log", base=2)
            ax.set_xticks(parallels or [1])
            ax.set_xticklabels([str(p) for p in parallels] or ["1"])
            ax.set_xlabel("n_parallel (sequences decoded together)")
            ax.set_ylabel(ylabel)
            ax.set_ylim(0, ax.get_ylim()[1] * 1.12)  # headroom so the chosen marker is not clipped
            ax.grid(True, alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize="small")
        fig.suptitle(title)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
    return path


def write_report(trials: Sequence[Trial], choice: Choice, constraint: Constraint, *, workload: Workload,
                 users: int, duration_s: int, out_dir: Path, stem: str = "report",
                 title: str = "edgeserve tuning", context: str = "") -> ReportFiles:
    """Write `<stem>.md` and `<stem>.png` into `out_dir`; `context` (machine, model) goes under the title."""
    out_dir.mkdir(parents=True, exist_ok=True)
    png = plot(trials, choice, constraint, out_dir / f"{stem}.png", title)
    if choice.best is not None:
        best = choice.best.setting
        pick = f"**Chosen: --n-parallel {best.n_parallel} --n-ctx {best.n_ctx}** ({choice.reason})."
    else:
        pick = f"**Nothing chosen:** {choice.reason}."
    parts = [f"# {title}", ""]
    if context:
        parts += [context, ""]
    parts += [describe_run(workload, users, duration_s, constraint), "", markdown_table(trials, choice), "",
              pick, "", f"![throughput and TTFT by n_parallel]({png.name})", ""]
    md = out_dir / f"{stem}.md"
    md.write_text("\n".join(parts), encoding="utf-8")
    return ReportFiles(markdown=md, plot=png)
