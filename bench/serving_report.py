"""The serving comparison as a markdown section for docs/BENCHMARKS.md, from serving_compare.py's JSON."""

from __future__ import annotations

from typing import Any

from serving_servers import REPO


def section(report: dict[str, Any]) -> str:
    """The markdown section for docs/BENCHMARKS.md: setup, table with ratios, llama-bench line.

    Reads reports of earlier (non-streamed) runs too: their decode and TTFT cells stay empty."""
    runs = {(r["server"], r["concurrency"]): r for r in report["runs"]}
    levels = sorted({r["concurrency"] for r in report["runs"]})
    tg, gen = report["llama_bench_tg_tokens_per_s"], report["gen_tokens"]
    is_streamed = bool(report.get("streamed"))
    names = ("edgeserve", "llama-server", "llama-cpp-python")

    def get(name: str, c: int, key: str) -> float | None:
        value = runs.get((name, c), {}).get(key)
        return float(value) if value is not None else None

    def cell(v: float | None) -> str:
        return f"{v:.0f}" if v else "—"

    def ms(v: float | None) -> str:
        return f"{v * 1000:.0f}" if v is not None else "—"

    def ratio(a: float | None, b: float | None) -> str:
        return f"{a / b:.2f}" if a and b else "—"

    how = (
        "streamed (SSE); per request TTFT = time to the first content chunk and decode rate = (generated "
        "tokens − 1) / (last − first content chunk). *t/s* = generated tokens of all requests / wall time "
        "(prefill included: what clients get in all); *decode t/s* = decode tokens (all but each request's "
        "first) / time during which at least one request was decoding: steady-state generation speed, "
        "the sum of the streams' decode rates where they decode side by side (not where a server takes "
        "them in turn), comparable with llama-bench tg at 1 stream; *TTFT p50* over all requests, ms"
        if is_streamed
        else "non-streamed; aggregate generated tokens/s over all streams (prefill included)"
    )
    lines = [
        f"## Serving comparison: {report['device']}, {report['date'][:10]}",
        "",
        f"Model `{report['model']}` ({report['model_bytes'] / 2**30:.2f} GiB); "
        f"{report['prompt_tokens']}-token prompts (distinct per request), {gen} generated tokens per request "
        f"(EOS ignored, greedy), {report['rounds']} request(s) per stream back to back; {how}. "
        f"(a) `edgeserve serve` (embedded engine, --n-parallel = streams), "
        f"(b) llama-server -np = streams, (c) llama-cpp-python's server (one for all levels). "
        f"Command: `{report['command']}`.",
        "",
        "| streams | (a) edgeserve t/s | (b) llama-server t/s | (c) llama-cpp-python t/s | (a)/(b) | (a)/(c) "
        "| (a) decode t/s | (b) decode t/s | (c) decode t/s "
        "| (a) TTFT p50 ms | (b) TTFT p50 ms | (c) TTFT p50 ms |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in levels:
        a, b, cc = (get(n, c, "tokens_per_s") for n in names)
        decode = " | ".join(cell(get(n, c, "decode_tokens_per_s")) for n in names)
        ttft = " | ".join(ms(get(n, c, "ttft_p50_s")) for n in names)
        lines.append(f"| {c} | {cell(a)} | {cell(b)} | {cell(cc)} | {ratio(a, b)} | {ratio(a, cc)} "
                     f"| {decode} | {ttft} |")
    lines.append("")
    if is_streamed:
        a1, b1 = get("edgeserve", 1, "decode_tokens_per_s"), get("llama-server", 1, "decode_tokens_per_s")
        lines.append(
            f"llama-bench tg{gen} (same run): {cell(tg)} t/s; decode t/s at 1 stream / tg{gen}: "
            f"(a) {ratio(a1, tg)}, (b) llama-server {ratio(b1, tg)} (for reference)"
        )
    else:
        lines.append(
            f"llama-bench tg{gen}: {cell(tg)} t/s; (a) at 1 stream / tg{gen} = "
            f"{ratio(get('edgeserve', 1, 'tokens_per_s'), tg)} (aggregate, prefill included)"
        )
    lines.append("")
    return "\n".join(lines)


def write_doc(text: str) -> None:
    doc = REPO / "docs" / "BENCHMARKS.md"
    doc.parent.mkdir(exist_ok=True)
    with doc.open("a") as fh:
        fh.write(("" if doc.exists() and doc.stat().st_size else "# edgeserve benchmarks\n") + "\n" + text)
    print(f"appended to {doc}")
