"""`edgeserve plan`: will this model fit this card, and at which quantization level and context?"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from rich.console import Console
from rich.panel import Panel
from rich.table import Table

from quantize.budget import (
    BACKENDS,
    DEFAULT_CONTEXTS,
    DEFAULT_HEADROOM_FRACTION,
    Budget,
    LevelTable,
    estimate,
    level_table,
)
from quantize.bundled import resolve_model_path
from quantize.model.gguf_file import GGUFReadError
from quantize.model.levels import UnknownLevelError, get_level
from quantize.model.reader import read_spec
from quantize.model.spec import ModelSpec
from quantize.model.units import GIB, MIB
from server.cli.options import FLASH_ATTN_HELP, KV_TYPE_HELP, N_CTX_HELP, N_PARALLEL_HELP, option
from server.hardware.cards import UnknownCardError
from server.hardware.target import resolve_target

DEFAULT_CONTEXTS_TEXT = ",".join(f"{c // 1024}k" for c in DEFAULT_CONTEXTS)

err = Console(stderr=True)


class PlanInputError(ValueError):
    """Bad input for `edgeserve plan`: reported as one line, exit status 2."""


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
    title = "GiB per device by level and n_ctx per sequence (* = best that fits)"
    table = Table(title=title, title_justify="left")
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
        f"{b.backend}: n_ctx {b.n_ctx} per sequence x n_parallel {b.n_parallel} = {b.n_ctx_total} KV tokens "
        f"({b.kv_cells} cells), KV {b.kv_type}, flash attention {'on' if b.flash_attn else 'off'}, "
        f"n_ubatch {b.n_ubatch}",
    ]
    if b.sglang is not None:
        s = b.sglang
        lines.append(
            f"SGLang: --mem-fraction-static {s.mem_fraction} --context-length {s.n_ctx} "
            f"--max-running-requests {s.n_parallel} --chunked-prefill-size "
            f"{s.chunked_prefill_size} (pool {s.kv_pool_tokens} tokens)"
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
    model_path: Path | None,
    card: str,
    gpus: int | None,
    backend: str,
    n_ctx: int,
    n_parallel: int,
    kv_type: str | None,
    flash_attn: str,
    level: str | None,
    n_batch: int,
    n_ubatch: int,
    kv_unified: bool,
    mem_fraction: float | None,
    headroom: float,
    contexts: str,
) -> tuple[Budget, LevelTable, ModelSpec]:
    """The plan as values (the CLI prints them); raises PlanInputError/ValueError on bad input."""
    if backend not in BACKENDS:
        raise PlanInputError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    spec = read_spec(resolve_model_path(model_path))
    target = resolve_target(card, gpus)
    lv = get_level(level) if level else None
    kwargs: dict[str, Any] = dict(
        backend=backend,
        n_parallel=n_parallel,
        kv_type=kv_type,
        flash_attn=flash_attn != "off",
        n_batch=n_batch,
        n_ubatch=n_ubatch,
        kv_unified=kv_unified,
        mem_fraction=mem_fraction,
        headroom_fraction=headroom,
    )
    budget = estimate(target, spec, lv, n_ctx=n_ctx, **kwargs)
    if not budget.is_valid:
        raise PlanInputError("; ".join(budget.reasons))
    table = level_table(target, spec, _parse_contexts(contexts), **kwargs)
    return budget, table, spec


def plan(
    model_path: Annotated[
        Path | None, option("model_path", "GGUF file or HF config.json / folder (default: bundled)")
    ] = None,
    card: Annotated[str, typer.Option(help="card id or name, 'auto' (detect) or 'cpu'")] = "auto",
    gpus: Annotated[
        int | None, typer.Option(help="number of identical GPUs (default: detected, else 1; 0 = CPU)")
    ] = None,
    backend: Annotated[str, typer.Option(help="llama-server | embedded | sglang")] = "llama-server",
    n_ctx: Annotated[int, option("n_ctx", N_CTX_HELP)] = 4096,
    n_parallel: Annotated[int, option("n_parallel", N_PARALLEL_HELP)] = 1,
    kv_type: Annotated[str | None, option("kv_type", KV_TYPE_HELP)] = None,
    flash_attn: Annotated[Literal["on", "off", "auto"], option("flash_attn", FLASH_ATTN_HELP)] = "on",
    level: Annotated[
        str | None, typer.Option(help="quantization level to plan for (default: the file's)")
    ] = None,
    n_batch: Annotated[int, option("n_batch", "logical batch (llama.cpp -b)")] = 2048,
    n_ubatch: Annotated[int, option("n_ubatch", "physical batch (llama.cpp -ub)")] = 512,
    kv_unified: Annotated[
        bool, option("kv_unified", "one KV pool shared by the sequences", is_bool=True)
    ] = False,
    mem_fraction: Annotated[
        float | None, option("mem_fraction", "SGLang --mem-fraction-static (default: picked)")
    ] = None,
    headroom: Annotated[float, typer.Option(help="fraction of memory kept free")] = DEFAULT_HEADROOM_FRACTION,
    contexts: Annotated[
        str, typer.Option(help="n_ctx values (per sequence) of the level table")
    ] = DEFAULT_CONTEXTS_TEXT,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object on stdout")] = False,
) -> None:
    """Memory breakdown and verdict, and the best quantization level per context length."""
    try:
        budget, table, spec = run_plan(
            model_path,
            card,
            gpus,
            backend,
            n_ctx,
            n_parallel,
            kv_type,
            flash_attn,
            level,
            n_batch,
            n_ubatch,
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
