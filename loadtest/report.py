"""Tuning reports: report.md with seed 004's two tables measured, and two PNGs.

The tables are "Batch Size Impact" and "Context Length Impact", then the batch-size and efficiency tables and
every run; the PNGs show throughput against latency per setting, and memory against context (measured and the
VRAM calculator's prediction).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI

import matplotlib.pyplot as plt
from pydantic import BaseModel, ConfigDict

from loadtest.result import TuneResult
from loadtest.selection import Setting, Slo, Trial, goodput, violations
from loadtest.workload import Workload
from quantize.model.units import MIB


class ReportFiles(BaseModel):
    model_config = ConfigDict(frozen=True)

    markdown: Path
    plots: tuple[Path, ...]


def _num(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / MIB:,.0f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---:|" * (len(header) - 1) + "---|"]
    clean = [[cell.replace("|", "/").replace("\n", " ") for cell in row] for row in rows]
    lines += ["| " + " | ".join(row) + " |" for row in clean]
    return "\n".join(lines)


def _line(trials: Sequence[Trial], through: Setting, axis: str) -> list[Trial]:
    """Measured trials that differ from `through` in `axis` alone, ordered along it."""
    others = [a for a in ("n_parallel", "n_ctx", "n_batch", "n_ubatch") if a != axis]
    same = [t for t in trials if all(getattr(t.setting, a) == getattr(through, a) for a in others)]
    return sorted(same, key=lambda t: getattr(t.setting, axis))


def _impact_rows(line: Sequence[Trial], axis: str, slo: Slo) -> list[list[str]]:
    rows = []
    for t in line:
        peak = t.peak
        note = t.failure.splitlines()[0][:100] if t.failure else ""
        rows.append([str(getattr(t.setting, axis)),
                     _num(peak.tokens_per_s if peak else None, 1), _num(goodput(t, slo), 3),
                     _num(peak.ttft_p95_ms if peak else None), _num(peak.e2e_p50_ms if peak else None),
                     _num(peak.itl_p50_ms if peak else None, 1), _mib(t.memory_bytes),
                     _mib(t.predicted_bytes), note])
    return rows


IMPACT_HEADER = ("tokens/s", "goodput req/s", "TTFT p95 ms", "latency p50 ms", "ITL p50 ms", "memory MiB",
                 "predicted MiB", "note")


def _sampling(w: Workload) -> str:
    if w.sampling == "varied":
        return ("each request its own sampling (temperature 0.6-1.1, top_p 0.9-1.0, some top_k, min_p, "
                "presence/frequency or repeat penalty)")
    return f"temperature {w.temperature}, top_p {w.top_p}"


def describe(result: TuneResult) -> str:
    """The conditions in one paragraph, so a table is never read without them."""
    cfg = result.bench
    w: Workload = cfg.workload
    eos = ", EOS ignored" if w.ignore_eos else ""
    return (f"Workload: Locust users matched to the slots (n_parallel users, closed loop) for "
            f"{cfg.duration_s} s per load point; where that misses the SLOs, up to {cfg.rate_steps} more "
            f"runs bisect the offered request rate. Requests: {w.mix}, shipped prompts ({w.prompt_lengths}, "
            f"up to about {w.max_prompt_tokens} tokens), max_tokens {w.max_tokens}{eos}, "
            f"{_sampling(w)}. SLOs: {result.slo.describe()}. Goodput = finished requests/s of the best load "
            "point that met the SLOs; tokens/s, TTFT, latency (end to end) and ITL are from the unpaced run "
            "at n_parallel users; memory is read while the server runs (GPU memory per process, else RSS); "
            "predicted is the VRAM calculator's figure for the plan.")


def impact_tables(result: TuneResult) -> list[str]:
    """Seed 004's two tables (and the physical batch's) through the chosen setting."""
    best = result.choice.best
    if best is None:
        return ["No setting met the SLOs: no impact tables."]
    s, trials, slo = best.setting, result.trials(), result.slo
    parts = [f"## Batch Size Impact (n_parallel, at n_ctx {s.n_ctx}, n_batch {s.n_batch}, n_ubatch "
             f"{s.n_ubatch})", "",
             _table(("n_parallel", *IMPACT_HEADER),
                    _impact_rows(_line(trials, s, "n_parallel"), "n_parallel", slo)),
             "",
             f"## Context Length Impact (n_ctx, at n_parallel {s.n_parallel}, n_batch {s.n_batch}, n_ubatch "
             f"{s.n_ubatch})", "",
             _table(("n_ctx", *IMPACT_HEADER), _impact_rows(_line(trials, s, "n_ctx"), "n_ctx", slo)), ""]
    skipped = [k for k in result.skipped() if k.setting.n_parallel == s.n_parallel
               and k.setting.n_batch == s.n_batch and k.setting.n_ubatch == s.n_ubatch]
    if skipped:
        parts += ["Contexts not run at this n_parallel: " + "; ".join(
            f"{k.setting.n_ctx} ({k.why})" for k in skipped) + ".", ""]
    ubatch = _line(trials, s, "n_ubatch")
    if len(ubatch) > 1:
        parts += [f"## Physical batch impact (n_ubatch, at n_parallel {s.n_parallel}, n_ctx {s.n_ctx})", "",
                  _table(("n_ubatch", *IMPACT_HEADER), _impact_rows(ubatch, "n_ubatch", slo)), ""]
    return parts


def efficiency_section(result: TuneResult) -> list[str]:
    e = result.efficiency
    if e is None:
        return []
    verdict = "meets" if e.meets_goal else "misses"
    return ["## Search against the grid", "", _table(
        ("", "search", "grid", "search / grid"),
        [["Locust runs", str(e.search_runs), str(e.grid_runs), f"{e.runs_ratio:.0%}"],
         ["settings started", str(e.search_starts), str(e.grid_starts),
          f"{e.search_starts / e.grid_starts:.0%}" if e.grid_starts else "-"],
         ["goodput req/s (search: its choice; grid: its best)", _num(e.search_goodput_rps, 3),
          _num(e.grid_goodput_rps, 3), f"{e.goodput_ratio:.1%}"]]), "",
            f"The search {verdict} the goal (>= 95 % of the grid's best goodput with <= 40 % of its runs). "
            "Settings the search measured were not measured again for the grid (each setting is started "
            "once).",
            ""]


def runs_table(result: TuneResult) -> str:
    best = result.choice.best
    rows = []
    for t in result.trials():
        if not t.points:
            rows.append([t.setting.label, "-", *["-"] * 8, _mib(t.memory_bytes),
                         f"did not run: {(t.failure or '').splitlines()[0][:120]}"])
        for p in t.points:
            s = p.summary
            missed = violations(p, result.slo)
            note = "; ".join(missed)[:140] if missed else "met the SLOs"
            if best is not None and t.setting == best.setting and not missed:
                note = "**chosen setting**; " + note
            cells = ["-"] * 8 if s is None else [
                str(s.requests_ok), str(s.requests_failed), _num(s.tokens_per_s, 1),
                _num(s.requests_per_s, 3),
                _num(s.ttft_p50_ms), _num(s.ttft_p95_ms), _num(s.itl_p50_ms, 1), _num(s.e2e_p95_ms)]
            rows.append([t.setting.label, p.load.label, *cells, _mib(t.memory_bytes), note])
    return _table(("setting", "load", "ok", "failed", "tokens/s", "req/s", "TTFT p50 ms", "TTFT p95 ms",
                   "ITL p50 ms", "latency p95 ms", "memory MiB", "verdict"), rows)


def _plot(path: Path, title: str, draw: Callable[[plt.Axes], None]) -> Path:
    fig, ax = plt.subplots(figsize=(9, 5))
    try:
        draw(ax)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="x-small", ncol=2)
        ax.set_title(title)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
    return path


def plot_throughput_latency(result: TuneResult, path: Path) -> Path:
    """One line per setting through its load points: aggregate tokens/s against TTFT p95."""
    def draw(ax: plt.Axes) -> None:
        best = result.choice.best
        for t in result.trials():
            pts = sorted((p.summary.ttft_p95_ms, p.summary.tokens_per_s) for p in t.points
                         if p.summary is not None and p.summary.ttft_p95_ms is not None)
            if pts:
                chosen = best is not None and t.setting == best.setting
                ax.plot([x for x, _ in pts], [y for _, y in pts], marker="*" if chosen else "o",
                        markersize=14 if chosen else 5,
                        label=t.setting.label + (" (chosen)" if chosen else ""))
        if result.slo.max_ttft_p95_ms is not None:
            ax.axvline(result.slo.max_ttft_p95_ms, color="red", linestyle="--", label="TTFT p95 limit")
        ax.set_xlabel("TTFT p95 (ms)")
        ax.set_ylabel("generated tokens/s (all users)")
        ax.set_ylim(bottom=0)

    return _plot(path, "throughput against latency, per setting", draw)


def plot_memory_context(result: TuneResult, path: Path) -> Path:
    """Memory against n_ctx, one line per n_parallel: measured (solid) and predicted (dashed)."""
    def draw(ax: plt.Axes) -> None:
        trials = result.trials()
        for n_parallel in sorted({t.setting.n_parallel for t in trials}):
            line = sorted((t for t in trials if t.setting.n_parallel == n_parallel),
                          key=lambda t: t.setting.n_ctx)
            measured = [(t.setting.n_ctx, t.memory_bytes / MIB) for t in line if t.memory_bytes is not None]
            predicted = [(t.setting.n_ctx, t.predicted_bytes / MIB) for t in line
                         if t.predicted_bytes is not None]
            color = f"C{n_parallel.bit_length() % 10}"  # one colour per n_parallel, both lines
            if measured:
                ax.plot(*zip(*measured, strict=True), marker="o", color=color,
                        label=f"n_parallel {n_parallel} measured")
            if predicted:
                ax.plot(*zip(*predicted, strict=True), marker="x", linestyle="--", color=color,
                        label=f"n_parallel {n_parallel} predicted")
        contexts = sorted({t.setting.n_ctx for t in trials})
        ax.set_xscale("log", base=2)
        ax.set_xticks(contexts or [1], [str(c) for c in contexts] or ["1"])
        ax.set_xlabel("n_ctx (tokens of one sequence)")
        ax.set_ylabel("memory (MiB)")

    return _plot(path, "memory against context", draw)


def write_report(result: TuneResult, out_dir: Path, *, stem: str = "report", title: str = "edgeserve tune",
                 context: str = "") -> ReportFiles:
    """Write `<stem>.md` and its two PNGs into `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tl = plot_throughput_latency(result, out_dir / f"{stem}_throughput_latency.png")
    mc = plot_memory_context(result, out_dir / f"{stem}_memory_context.png")
    best = result.choice.best
    if best is not None:
        s = best.setting
        pick = (f"**Chosen: n_parallel {s.n_parallel}, n_ctx {s.n_ctx}, n_batch {s.n_batch}, n_ubatch "
                f"{s.n_ubatch}** ({result.choice.reason}).")
        pick += f" Run it: `{result.launch_command()}`."
        if result.profile_path:
            pick += (f" Saved as the card's tuned profile (`{Path(result.profile_path).name}` in the tuned "
                     f"profiles folder): `edgeserve launch` uses it until `edgeserve tune forget --card "
                     f"{result.card}`.")
        else:
            pick += " Not saved: `edgeserve tune apply results.json` makes it the card's tuned profile."
    else:
        pick = f"**Nothing chosen:** {result.choice.reason}."
    head = context or (f"{result.date}, {result.machine}; backend {result.backend} on card {result.card}; "
                       f"model {result.model}.")
    parts = [f"# {title}", "", head, "", describe(result), "", pick, "", *impact_tables(result),
             *efficiency_section(result), "## Every run", "", runs_table(result), ""]
    skipped = result.skipped()
    if skipped:
        listed = "; ".join(f"{k.setting.label}: {k.why}" for k in skipped[:40])
        parts += [f"Not run ({len(skipped)}): " + listed
                  + ("; ..." if len(skipped) > 40 else "") + ".", ""]
    parts += [f"![throughput against latency]({tl.name})", "", f"![memory against context]({mc.name})", ""]
    md = out_dir / f"{stem}.md"
    md.write_text("\n".join(parts), encoding="utf-8")
    return ReportFiles(markdown=md, plots=(tl, mc))
