"""`edgeserve plan`: will this model fit this card, and at which quantization level and context?"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.panel import Panel
from rich.table import Table

from quantize.budget import (
    BACKENDS,
    DEFAULT_CONTEXTS,
    DEFAULT_HEADROOM_FRACTION,
    Budget,
    CpuTarget,
    LevelTable,
    estimate,
    level_table,
)
from quantize.gguf_model import GGUFReadError, read_model_spec
from quantize.hf_config import model_spec_from_hf_config
from quantize.levels import UnknownLevelError, get_level
from quantize.model_spec import ModelSpec
from server.cards import GpuSet, UnknownCardError, get_card

MIB = 1 << 20
GIB = 1 << 30
FALLBACK_RAM_BYTES = 8 * GIB

DEFAULT_CONTEXTS_TEXT = ",".join(f"{c // 1024}k" for c in DEFAULT_CONTEXTS)

err = Console(stderr=True)


class PlanInputError(ValueError):
    """Bad input for `edgeserve plan`: reported as one line, exit status 2."""


def load_spec(path: Path) -> ModelSpec:
    """A GGUF file, or a Hugging Face config.json (or the folder holding one)."""
    if path.is_dir() or path.suffix == ".json":
        return model_spec_from_hf_config(path)
    return read_model_spec(path)


def resolve_target(card: str, gpus: int | None) -> GpuSet | CpuTarget:
    """--card auto|cpu|ID and --gpus N -> what to budget against."""
    if gpus is not None and gpus < 1:
        raise PlanInputError(f"--gpus must be at least 1, got {gpus}")
    key = card.strip().lower()
    if key in ("auto", "cpu"):
        from server.detect import detect, gpu_set_from_detection

        det = detect()
        gpu_set = None if key == "cpu" else gpu_set_from_detection(det)
        if gpu_set is None:
            if gpus is not None and gpus > 1:
                raise PlanInputError(
                    "--gpus needs a GPU card; this machine has none (or --card cpu was given)"
                )
            return CpuTarget(ram_bytes=det.cpu.total_ram_bytes or FALLBACK_RAM_BYTES)
        if gpus is not None:
            gpu_set = gpu_set.model_copy(update={"count": gpus})
        return gpu_set
    return GpuSet.of(get_card(card), count=gpus or 1)


def _mib(n: int) -> str:
    return f"{n / MIB:,.0f}"


def _gib(n: int) -> str:
    return f"{n / GIB:.2f}"


def _breakdown(b: Budget) -> Table:
    table = Table(title="memory per device (MiB)", title_justify="left")
    table.add_column("")
    devices = b.per_gpu if len(b.per_gpu) > 1 else b.per_gpu[:1]
    for g in devices:
        label = "CPU" if b.card == "cpu" else f"GPU {g.index}"
        if len(devices) > 1 and g.layers:
            label += f" (layers {g.layers[0]}-{g.layers[1]}{', output' if g.has_output else ''})"
        table.add_column(label, justify="right")
    for name, attr in (
        ("weights", "weights_bytes"),
        ("KV cache", "kv_bytes"),
        ("compute", "compute_bytes"),
        ("CUDA/runtime" if b.card != "cpu" else "runtime", "overhead_bytes"),
        ("total", "total_bytes"),
        ("memory", "memory_bytes"),
        ("headroom", "headroom_bytes"),
    ):
        style = "bold" if name == "total" else ""
        table.add_row(
            name,
            *[f"[{style}]{_mib(getattr(g, attr))}[/]" if style else _mib(getattr(g, attr)) for g in devices],
        )
    return table


def _verdict(b: Budget) -> str:
    usable = f"{_gib(b.usable_bytes)} GiB usable of {_gib(b.memory_bytes)} GiB"
    if b.fits:
        return f"[bold green]FITS[/]: {_gib(b.total_bytes)} GiB per device, {usable}"
    return f"[bold red]DOES NOT FIT[/]: {_gib(b.total_bytes)} GiB per device, {usable}"


def _level_table(t: LevelTable) -> Table:
    table = Table(title="GiB per device by level and -c (* = best that fits)", title_justify="left")
    table.add_column("level")
    table.add_column("weights GiB", justify="right")
    for c in t.contexts:
        table.add_column(f"{c // 1024}k" if c % 1024 == 0 else str(c), justify="right")
    for row in t.rows:
        cells = []
        for j, (_, total, fits) in enumerate(row.cells):
            mark = "*" if t.best[j] == row.level else " "
            cells.append(f"[{'green' if fits else 'red'}]{_gib(total)}{mark}[/]")
        table.add_row(row.level, _gib(row.weights_bytes), *cells)
    table.add_row("[bold]best[/]", "", *[f"[bold]{b or '-'}[/]" for b in t.best])
    return table


def _header(spec: ModelSpec, b: Budget) -> Panel:
    n_params = spec.n_params
    swa = (
        f", SWA {spec.sliding_window} on {sum(spec.swa_layers)}/{spec.n_layer} layers" if spec.has_swa else ""
    )
    lines = [
        f"[bold]{spec.name}[/] ({spec.architecture}, {n_params / 1e9:.2f} B params, {spec.n_layer} layers, "
        f"{spec.n_embd} embd, {spec.n_head}/{spec.n_head_kv_max} heads q/kv, head dim {spec.head_dim_k}, "
        f"vocab {spec.n_vocab}{swa})",
        f"file: {spec.file_type_name or '-'} -> {b.quant}{' (estimated)' if b.is_estimated_quant else ''}, "
        f"weights {_gib(spec.weights_bytes)} GiB",
        f"target: {b.gpus}x {b.card_name} ({b.card})" if b.card != "cpu" else "target: CPU, system RAM",
        f"{b.backend}: -c {b.n_ctx} ({b.n_ctx_per_seq} per slot), {b.n_parallel} parallel, KV {b.kv_type}, "
        f"flash attention {'on' if b.flash_attn else 'off'}, ubatch {b.n_ubatch}",
    ]
    if b.sglang is not None:
        s = b.sglang
        lines.append(
            f"SGLang: --mem-fraction-static {s.mem_fraction_static} --context-length {s.context_length} "
            f"--max-running-requests {s.max_running_requests} --chunked-prefill-size "
            f"{s.chunked_prefill_size} (pool {s.max_total_tokens} tokens)"
        )
    return Panel("\n".join(lines), title="edgeserve plan", title_align="left")


def _parse_contexts(text: str) -> tuple[int, ...]:
    try:
        values = tuple(
            int(x.strip().lower().replace("k", "")) * (1024 if "k" in x.lower() else 1)
            for x in text.split(",")
            if x.strip()
        )
    except ValueError:
        raise PlanInputError(f"--contexts takes a comma list such as 2k,4k,8k; got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise PlanInputError(f"--contexts needs positive sizes; got {text!r}")
    return values


def run_plan(
    model: Path | None,
    card: str,
    gpus: int | None,
    backend: str,
    ctx: int,
    parallel: int,
    kv_type: str | None,
    flash_attn: bool,
    level: str | None,
    ubatch: int,
    kv_unified: bool,
    mem_fraction: float | None,
    headroom: float,
    contexts: str,
) -> tuple[Budget, LevelTable, ModelSpec]:
    """The plan as values (the CLI prints them); raises PlanInputError/ValueError on bad input."""
    if backend not in BACKENDS:
        raise PlanInputError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if model is None:
        from quantize.bundled import default_model_path

        model = default_model_path()
    spec = load_spec(model)
    target = resolve_target(card, gpus)
    lv = get_level(level) if level else None
    kwargs: dict[str, Any] = dict(
        backend=backend,
        n_parallel=parallel,
        kv_type=kv_type,
        flash_attn=flash_attn,
        n_ubatch=ubatch,
        kv_unified=kv_unified,
        mem_fraction=mem_fraction,
        headroom_fraction=headroom,
    )
    budget = estimate(target, spec, lv, n_ctx=ctx, **kwargs)
    if not budget.is_valid:
        raise PlanInputError("; ".join(budget.reasons))
    table = level_table(target, spec, _parse_contexts(contexts), **kwargs)
    return budget, table, spec


def plan(
    model: Annotated[
        Path | None, typer.Option("--model", help="GGUF file or HF config.json (default: bundled)")
    ] = None,
    card: Annotated[str, typer.Option(help="card id or name, 'auto' (detect) or 'cpu'")] = "auto",
    gpus: Annotated[
        int | None, typer.Option(help="number of identical GPUs (default: detected, else 1)")
    ] = None,
    backend: Annotated[str, typer.Option(help="llama-server | embedded | sglang")] = "llama-server",
    ctx: Annotated[int, typer.Option(help="total context over all slots (llama.cpp -c)")] = 4096,
    parallel: Annotated[int, typer.Option(help="parallel sequences (slots)")] = 1,
    kv_type: Annotated[
        str | None, typer.Option(help="f16|q8_0|q4_0 (llama.cpp); auto|fp8_e5m2|fp8_e4m3 (SGLang)")
    ] = None,
    flash_attn: Annotated[bool, typer.Option("--flash-attn/--no-flash-attn")] = True,
    level: Annotated[
        str | None, typer.Option(help="quantization level to plan for (default: the file's)")
    ] = None,
    ubatch: Annotated[int, typer.Option(help="physical batch (llama.cpp -ub)")] = 512,
    kv_unified: Annotated[bool, typer.Option("--kv-unified/--no-kv-unified")] = False,
    mem_fraction: Annotated[
        float | None, typer.Option(help="SGLang mem_fraction_static (default: picked)")
    ] = None,
    headroom: Annotated[float, typer.Option(help="fraction of memory kept free")] = DEFAULT_HEADROOM_FRACTION,
    contexts: Annotated[str, typer.Option(help="contexts of the level table")] = DEFAULT_CONTEXTS_TEXT,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object on stdout")] = False,
) -> None:
    """Memory breakdown and verdict, and the best quantization level per context length."""
    try:
        budget, table, spec = run_plan(
            model,
            card,
            gpus,
            backend,
            ctx,
            parallel,
            kv_type,
            flash_attn,
            level,
            ubatch,
            kv_unified,
            mem_fraction,
            headroom,
            contexts,
        )
    except (PlanInputError, GGUFReadError, UnknownCardError, UnknownLevelError, ValueError, OSError) as exc:
        err.print(f"[red]error:[/] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    if as_json:
        out = budget.model_dump(mode="json")
        out["table"] = table.model_dump(mode="json")
        out["model_spec"] = spec.model_dump(mode="json", exclude={"tensors"})
        typer.echo(json.dumps(out))
        return
    console = Console()
    console.print(_header(spec, budget))
    console.print(_breakdown(budget))
    console.print(_verdict(budget))
    for r in budget.reasons:
        console.print(f"  [red]-[/] {r}", highlight=False)
    for n in budget.notes:
        console.print(f"  [dim]- {n}[/]", highlight=False)
    console.print(_level_table(table))


def register(app: typer.Typer) -> None:
    app.command("plan")(plan)
