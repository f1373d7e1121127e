"""docs/EXPERIMENTS.md from measured llama-bench rows: per experiment, seed 002's expectation beside what was
measured, the data table, and a PNG where a curve says more. Pure except the PNG and file writing."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from experiments import KV_TYPES, Experiment
from llama_bench import BenchRow

NOT_RUN = "not run yet"


@dataclass(frozen=True)
class RunMeta:
    """Where and how the rows were measured; the device is named in every section."""

    date: str
    device: str
    backends: str
    build: str
    model: str
    command: str


@dataclass(frozen=True)
class Findings:
    measured: tuple[str, ...]  # one line per seed 002 claim, same order
    table: str
    png: Callable[[Path], None] | None = None
    note: str = ""


def _fmt(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:,.{digits}f}"


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None or b == 0 else f"x{a / b:.2f}"


def table(header: Sequence[str], rows: Iterable[Sequence[str]], *, numbers: bool = True) -> str:
    """A markdown table; with `numbers`, every column but the first is right-aligned."""
    align = ["---" if i == 0 or not numbers else "---:" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def pick(rows: Iterable[BenchRow], **want: object) -> BenchRow | None:
    """The row whose fields equal `want` (prompt=True/False selects pp or tg rows)."""
    for row in rows:
        if all((row.is_prompt if k == "prompt" else getattr(row, k)) == v for k, v in want.items()):
            return row
    return None


def ts(rows: Iterable[BenchRow], **want: object) -> float | None:
    row = pick(rows, **want)
    return None if row is None else row.avg_ts


def mib(rows: Iterable[BenchRow], buffer: str, **want: object) -> float | None:
    """The KV (`kv_mib`) or compute (`compute_mib`) buffer of the matching row's context."""
    row = pick(rows, **want)
    return None if row is None else getattr(row, buffer)


# --- flash attention ------------------------------------------------------------------------------------


def flash_attn_findings(rows: Sequence[BenchRow]) -> Findings:
    depths = sorted({r.n_depth for r in rows})
    body = []
    for d in depths:
        pp = [ts(rows, n_depth=d, flash_attn=fa, prompt=True) for fa in (0, 1)]
        tg = [ts(rows, n_depth=d, flash_attn=fa, prompt=False) for fa in (0, 1)]
        mem = [mib(rows, "compute_mib", n_depth=d, flash_attn=fa, prompt=True) for fa in (0, 1)]
        body.append([str(d), _fmt(pp[0]), _fmt(pp[1]), _ratio(pp[1], pp[0]), _fmt(tg[0]), _fmt(tg[1]),
                     _ratio(tg[1], tg[0]), _fmt(mem[0]), _fmt(mem[1])])
    deep, shallow = max(depths), min(depths)
    pp_gain = _ratio(ts(rows, n_depth=deep, flash_attn=1, prompt=True), ts(rows, n_depth=deep, flash_attn=0,
                                                                            prompt=True))
    tg_gain = _ratio(ts(rows, n_depth=deep, flash_attn=1, prompt=False), ts(rows, n_depth=deep, flash_attn=0,
                                                                             prompt=False))
    off_mem = mib(rows, "compute_mib", n_depth=deep, flash_attn=0, prompt=True)
    on_mem = mib(rows, "compute_mib", n_depth=deep, flash_attn=1, prompt=True)

    def kept(fa: int) -> str:
        a, b = ts(rows, n_depth=deep, flash_attn=fa, prompt=True), ts(rows, n_depth=shallow, flash_attn=fa,
                                                                        prompt=True)
        return "-" if a is None or not b else f"{100 * a / b:.0f}%"

    measured = (
        f"at depth {deep}: prompt {pp_gain}, decode {tg_gain} (on vs off)",
        f"compute buffer at depth {deep}: {_fmt(off_mem, 0)} MiB off, {_fmt(on_mem, 0)} MiB on "
        f"(off/on {_ratio(off_mem, on_mem)})",
        f"prompt speed at depth {deep} as a share of depth {shallow}: off {kept(0)}, on {kept(1)}",
    )
    header = ["depth", "pp t/s off", "pp t/s on", "pp on/off", "tg t/s off", "tg t/s on", "tg on/off",
              "compute MiB off", "compute MiB on"]

    def png(path: Path) -> None:
        plot_lines(path, "tokens/s against context depth", "depth (tokens already in the KV cache)",
                   {f"{kind} FA {'on' if fa else 'off'}": [(d, ts(rows, n_depth=d, flash_attn=fa,
                                                                  prompt=kind == "prompt"))
                                                           for d in depths]
                    for kind in ("prompt", "decode") for fa in (0, 1)})

    return Findings(measured, table(header, body), png)


# --- KV types -------------------------------------------------------------------------------------------


def kv_type_findings(rows: Sequence[BenchRow]) -> Findings:
    deep = max((r.n_depth for r in rows), default=0)
    f16_kv = mib(rows, "kv_mib", type_k="f16", n_depth=deep, prompt=False)
    f16_tg = ts(rows, type_k="f16", n_depth=deep, prompt=False)
    body, saving, speed = [], [], []
    for t in KV_TYPES:
        kv = mib(rows, "kv_mib", type_k=t, n_depth=deep, prompt=False)
        share = None if kv is None or not f16_kv else 100 * kv / f16_kv
        body.append([t, _fmt(kv), "-" if share is None else f"{share:.0f}%",
                     _fmt(ts(rows, type_k=t, n_depth=0, prompt=True)),
                     _fmt(ts(rows, type_k=t, n_depth=deep, prompt=True)),
                     _fmt(ts(rows, type_k=t, n_depth=0, prompt=False)),
                     _fmt(ts(rows, type_k=t, n_depth=deep, prompt=False))])
        if t != "f16":
            saving.append(f"{t} {'-' if share is None else f'{100 - share:.0f}%'}")
            speed.append(f"{t} {_ratio(ts(rows, type_k=t, n_depth=deep, prompt=False), f16_tg)}")
    measured = (f"KV memory saved against f16: {', '.join(saving)}",
                f"decode at depth {deep} against f16: {', '.join(speed)}")
    header = ["KV type", f"KV MiB (tg context, depth {deep})", "of f16", "pp t/s d0", f"pp t/s d{deep}",
              "tg t/s d0", f"tg t/s d{deep}"]
    return Findings(measured, table(header, body))


# --- batch sizes ----------------------------------------------------------------------------------------


def batch_findings(rows: Sequence[BenchRow]) -> Findings:
    ordered = sorted((r for r in rows if r.is_prompt), key=lambda r: r.n_ubatch)
    body = [[str(r.n_ubatch), str(r.n_batch), _fmt(r.avg_ts), _fmt(r.compute_mib)] for r in ordered]
    best = max(ordered, key=lambda r: r.avg_ts) if ordered else None
    measured = (
        f"prompt tokens/s, n_ubatch {ordered[-1].n_ubatch} against {ordered[0].n_ubatch}: "
        f"{_ratio(ordered[-1].avg_ts, ordered[0].avg_ts)}; fastest at n_ubatch {best.n_ubatch}"
        if ordered and best else NOT_RUN,
    )

    def png(path: Path) -> None:
        plot_lines(path, f"prompt processing (n_batch {ordered[0].n_batch})", "n_ubatch",
                   {"pp tokens/s": [(r.n_ubatch, r.avg_ts) for r in ordered]}, log_x=True)

    header = ["n_ubatch", "n_batch", "pp t/s", "compute MiB"]
    return Findings(measured, table(header, body), png if ordered else None)


# --- CUDA graphs ----------------------------------------------------------------------------------------


def cuda_graph_findings(rows: Sequence[BenchRow]) -> Findings:
    body, lines = [], []
    for prompt in (True, False):
        on, off = ts(rows, label="graphs on", prompt=prompt), ts(rows, label="graphs off", prompt=prompt)
        row = pick(rows, label="graphs on", prompt=prompt)
        change = "-" if on is None or not off else f"{100 * (on - off) / off:+.1f}%"
        body.append([row.test if row else "-", _fmt(on), _fmt(off), change])
        if not prompt:
            lines.append(f"decode (batch 1) with graphs against without: {change} tokens/s")
    note = "" if any("CUDA" in r.backends for r in rows) else (
        "CUDA graphs exist in the CUDA backend only: on this device both columns run the same code.")
    return Findings((*lines, "not measured: llama.cpp captures graphs per shape and re-captures on a change"),
                    table(["test", "graphs on t/s", "graphs off t/s", "change"], body), note=note)


# --- power limit ----------------------------------------------------------------------------------------


def power_findings(rows: Sequence[BenchRow], limits: Sequence[float], refused: str | None) -> Findings:
    if refused:
        return Findings((f"not measured: {refused}",), "")
    body, per_watt = [], []
    for watts in limits:
        label = f"{watts:g} W"
        pp, tg = ts(rows, label=label, prompt=True), ts(rows, label=label, prompt=False)
        per_watt.append((watts, tg))
        body.append([f"{watts:g}", _fmt(pp), _fmt(tg), "-" if tg is None else f"{tg / watts:.3f}"])
    top, low = per_watt[0], per_watt[-1]
    gain = "-" if None in (top[1], low[1]) else (
        f"{100 * ((low[1] / low[0]) / (top[1] / top[0]) - 1):+.0f}% decode tokens/s per limit watt "  # type: ignore[operator]
        f"at {low[0]:g} W against {top[0]:g} W ({_ratio(low[1], top[1])} the speed)")

    def png(path: Path) -> None:
        plot_lines(path, "decode speed against the power limit", "power limit (W)",
                   {"tg tokens/s": [(w, t) for w, t in per_watt]})

    return Findings((gain,), table(["power limit W", "pp t/s", "tg t/s", "tg t/s per W"], body),
                    png if len(limits) > 1 else None)


# --- markdown and PNG -----------------------------------------------------------------------------------


def plot_lines(path: Path, title: str, xlabel: str, series: dict[str, list[tuple[float, float | None]]],
               *, log_x: bool = False) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, points in series.items():
        xs = [x for x, y in points if y is not None]
        ax.plot(xs, [y for _, y in points if y is not None], marker="o", label=name)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("tokens/s")
    if log_x:
        ax.set_xscale("log", base=2)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def section(exp: Experiment, findings: Findings | None, meta: RunMeta | None, png_name: str | None) -> str:
    """One experiment's block of docs/EXPERIMENTS.md; without findings every measured cell says so."""
    measured = findings.measured if findings else (NOT_RUN,) * len(exp.expected)
    claims = table(["seed 002 expected", "measured"],
                   ([c, m] for c, m in zip(exp.expected, measured, strict=False)), numbers=False)
    lines = [f"### {exp.title}", ""]
    if meta is None:
        lines += [f"Measured: {NOT_RUN}.", ""]
    else:
        lines += [f"Measured {meta.date} on **{meta.device}** ({meta.backends}, llama.cpp build "
                  f"{meta.build}), model {meta.model}.", "", f"    {meta.command}", ""]
    lines += [claims, ""]
    if findings and findings.table:
        lines += [findings.table, ""]
        if findings.note:
            lines += [findings.note, ""]
        if png_name:
            lines += [f"![{exp.title}](experiments/{png_name})", ""]
    return "\n".join(lines).rstrip() + "\n"


def replace_section(doc: str, name: str, body: str) -> str:
    """Put `body` between `<!-- experiment:NAME -->` and `<!-- /experiment:NAME -->` (both must be there)."""
    key = re.escape(name)
    pattern = re.compile(rf"(<!-- experiment:{key} -->\n).*?(<!-- /experiment:{key} -->)", re.DOTALL)
    if not pattern.search(doc):
        raise ValueError(f"no <!-- experiment:{name} --> block in the document")
    return pattern.sub(lambda m: m.group(1) + body + m.group(2), doc)
