"""The serving comparison as a markdown section for docs/BENCHMARKS.md, from serving_compare.py's JSON."""

from __future__ import annotations

from typing import Any

from serving_servers import REPO

OURS = "edgeserve"
PHASES = ("wait", "decode", "sample", "schedule", "emit", "deliver")


def _f(v: float | None, scale: float = 1.0, digits: int = 0) -> str:
    return f"{v * scale:.{digits}f}" if v is not None else "—"


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a and b else "—"


def _model_section(m: dict[str, Any], gen: int) -> list[str]:
    runs = {(r["server"], r["shape"], r["concurrency"]): r for r in m["runs"]}
    servers = list(dict.fromkeys(r["server"] for r in m["runs"]))
    others = [s for s in servers if s != OURS]
    shapes = list(dict.fromkeys(r["shape"] for r in m["runs"]))

    def get(server: str, shape: str, c: int, key: str) -> float | None:
        v = runs.get((server, shape, c), {}).get(key)
        return float(v) if v is not None else None

    out = [f"### {m['model']} ({m['model_bytes'] / 2**30:.2f} GiB), {m['slots']} slots per server", ""]
    head = ["shape", "streams", *(f"{s} t/s" for s in servers), *(f"{OURS}/{s}" for s in others),
            *(f"{s} ITL p50 ms" for s in servers), *(f"{s} TTFT p50 ms" for s in servers)]
    out += ["| " + " | ".join(head) + " |", "|" + "---|" * 2 + "---:|" * (len(head) - 2)]
    for shape in shapes:
        for c in sorted({r["concurrency"] for r in m["runs"] if r["shape"] == shape}):
            cells = [shape, str(c)]
            cells += [_f(get(s, shape, c, "tokens_per_s")) for s in servers]
            ours = get(OURS, shape, c, "tokens_per_s")
            cells += [_ratio(ours, get(s, shape, c, "tokens_per_s")) for s in others]
            cells += [_f(get(s, shape, c, "itl_p50_s"), 1000, 1) for s in servers]
            cells += [_f(get(s, shape, c, "ttft_p50_s"), 1000) for s in servers]
            errors = sum(int(runs.get((s, shape, c), {}).get("errors", 0)) for s in servers)
            out.append("| " + " | ".join(cells) + " |" + (f" {errors} errors" if errors else ""))
    out.append("")
    limits = m.get("batched_bench_s_tg") or {}
    if limits and "greedy" in shapes:
        out += ["Greedy decode t/s against llama-batched-bench S_TG (same build, same run; PP 256, "
                f"TG {gen}, -fa on):", "",
                "| streams | S_TG | " + " | ".join(f"{s} decode t/s | {s}/S_TG" for s in servers) + " |",
                "|---:|---:|" + "---:|---:|" * len(servers)]
        for c_str, s_tg in sorted(limits.items(), key=lambda kv: int(kv[0])):
            c = int(c_str)
            cells = [c_str, _f(s_tg)]
            for s in servers:
                d = get(s, "greedy", c, "decode_tokens_per_s")
                cells += [_f(d), _ratio(d, s_tg)]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    tg = m.get("llama_bench_tg_tokens_per_s")
    if tg:
        ones = ", ".join(f"{s} {_ratio(get(s, 'greedy', 1, 'decode_tokens_per_s'), tg)}" for s in servers)
        out += [f"llama-bench tg{gen}: {_f(tg)} t/s; greedy decode t/s at one stream / tg{gen}: {ones}.", ""]
    profiled = [r for r in m["runs"] if r["server"] == OURS and r.get("engine_profile")]
    if profiled:
        out += [f"{OURS}'s decode thread, ms per step by phase (server/engine/step_profile.py; wait + decode "
                "= llama.cpp's share; emit and deliver overlap the next step on a GPU):", "",
                "| shape | streams | steps | " + " | ".join(PHASES) + " | engine share |",
                "|---|---:|---:|" + "---:|" * (len(PHASES) + 1)]
        for r in profiled:
            p = r["engine_profile"]
            total = sum(p.get(ph, 0.0) for ph in PHASES)
            llama = p.get("wait", 0.0) + p.get("decode", 0.0)
            share = f"{(total - llama) / total:.0%}" if total else "—"
            out.append(f"| {r['shape']} | {r['concurrency']} | {p['steps']:.0f} | "
                       + " | ".join(f"{p.get(ph, 0.0):.2f}" for ph in PHASES) + f" | {share} |")
        out.append("")
    return out


def section(report: dict[str, Any]) -> str:
    """The markdown section: setup, one table per model with ratios, the C++ limits, the step profile."""
    lines = [
        f"## Serving by request shape: {report['device']}, {report['date'][:10]}",
        "",
        f"Command: `{report['command']}` ({report.get('duration_s', '?')} s). Every request streamed, "
        f"{report['gen_tokens']} generated tokens (EOS ignored), prompts distinct per request and the same "
        "for every server. *t/s* = generated tokens of all requests / wall time (prefill included); *ITL* = "
        "time between streamed content chunks; *TTFT* = time to the first content chunk. Shapes:",
        "",
        *(f"- **{name}**: {about}" for name, about in report["shapes"].items()),
        "",
    ]
    for m in report["models"]:
        lines += _model_section(m, report["gen_tokens"])
    return "\n".join(lines)


def write_doc(text: str) -> None:
    doc = REPO / "docs" / "BENCHMARKS.md"
    doc.parent.mkdir(exist_ok=True)
    with doc.open("a") as fh:
        fh.write(("" if doc.exists() and doc.stat().st_size else "# edgeserve benchmarks\n") + "\n" + text)
    print(f"appended to {doc}")
