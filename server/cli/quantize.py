"""`edgeserve quantize`: pick a level from the budget, quantize with llama.cpp, verify, measure quality."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from quantize.budget import BACKENDS
from quantize.budget.auto_level import LevelChoice, NoLevelFitsError, choose_level
from quantize.eval_table import DEFAULT_EVAL_CTX, QualityTable, default_eval_text, quality_table
from quantize.model.levels import QuantLevel
from quantize.model.units import MIB
from quantize.perplexity import EvalTextTooShortError
from quantize.pipeline import (
    PipelineError,
    QuantizeOptions,
    QuantizeResult,
    execute,
    prepare,
    read_source,
    resolve_level,
)
from quantize.runner import TensorProgress
from server.cli.options import KV_TYPE_HELP, N_CTX_HELP, N_PARALLEL_HELP, option
from server.hardware.cards import UnknownCardError
from server.hardware.target import TargetError, resolve_target

out = Console()
err = Console(stderr=True)


class _TensorBar:
    """A rich progress bar over the tensors llama.cpp quantizes (it logs one line per tensor)."""

    def __init__(self, label: str, enabled: bool) -> None:
        self.label = label
        self.enabled = enabled
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[tensor]}"),
            TimeElapsedColumn(),
            console=err,
            transient=True,
        )
        self.task: Any = None

    def __enter__(self) -> _TensorBar:
        if self.enabled:
            self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self.progress.__exit__(None, None, None)

    def reset(self) -> None:
        """Start a new bar for the next quantization."""
        if self.task is not None:
            self.progress.remove_task(self.task)
            self.task = None

    def __call__(self, p: TensorProgress) -> None:
        if not self.enabled:
            return
        if self.task is None:
            self.task = self.progress.add_task(self.label, total=p.total, tensor="")
        if p.is_done:
            self.progress.update(self.task, completed=p.index, tensor=f"{p.name} -> {p.target_type}")
        else:
            self.progress.update(self.task, tensor=p.name)


def _fail(message: str, code: int = 2) -> typer.Exit:
    err.print(f"[red]error:[/] {message}", highlight=False, soft_wrap=True, markup=True)
    return typer.Exit(code=code)


def _mib(n: int) -> str:
    return f"{n / MIB:,.0f}"


def _choice_table(choice: LevelChoice) -> Table:
    b0 = choice.budget
    table = Table(
        title=f"level auto: {choice.target_label}, {b0.backend}, n_ctx {b0.n_ctx} x n_parallel "
        f"{b0.n_parallel}, KV {b0.kv_type}",
        title_justify="left",
    )
    for col in ("level", "GPU weights MiB", "total MiB", "usable MiB", "headroom MiB", "fits"):
        table.add_column(col, justify="left" if col == "level" else "right")
    for lv, b in choice.candidates:
        chosen = lv.name == choice.level.name
        table.add_row(
            f"[bold green]{lv.name} <-[/]" if chosen else lv.name,
            _mib(b.weights_bytes),
            _mib(b.total_bytes),
            _mib(b.usable_bytes),
            _mib(b.headroom_bytes),
            "[green]yes[/]" if b.fits else "[red]no[/]",
        )
    return table


def _result_table(r: QuantizeResult) -> Table:
    m = r.manifest
    table = Table(title=f"{r.out}", title_justify="left", show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    table.add_row("level", f"{m.level} (llama_ftype {m.llama_ftype})")
    table.add_row(
        "size",
        f"{_mib(m.output.size_bytes)} MiB, {m.bits_per_weight:.3f} bits per weight "
        f"(predicted {_mib(m.expected_bytes)} MiB)",
    )
    table.add_row("tensors", ", ".join(f"{t} {n}" for t, n in m.tensor_types.items()))
    table.add_row(
        "time", f"quantize {m.quantize_seconds:.1f} s, verify {m.verify_seconds:.1f} s, {m.n_threads} threads"
    )
    for c in m.checks:
        mark = "[green]ok[/]" if c.is_ok else ("[red]FAILED[/]" if c.is_fatal else "[yellow]warning[/]")
        table.add_row(f"check {c.name}", f"{mark} {c.detail}")
    table.add_row("sample", repr(m.sample))
    table.add_row("manifest", str(r.manifest_path))
    return table


def _quality_table(t: QualityTable) -> Table:
    name = Path(t.eval_text).name
    title = f"quality on {name}: {t.n_scored} tokens scored, {t.n_chunks} windows of {t.n_ctx}"
    table = Table(title=title, title_justify="left")
    for col in (
        "level",
        "size MiB",
        "bits/weight",
        "perplexity",
        "vs source",
        "decode tok/s",
        "prompt tok/s",
    ):
        table.add_column(col, justify="left" if col == "level" else "right")
    for row in t.rows:
        delta = "-" if row.ppl_increase is None else f"{row.ppl_increase * 100:+.2f} %"
        table.add_row(
            row.label,
            _mib(row.size_bytes),
            f"{row.bits_per_weight:.3f}",
            f"{row.ppl:,.3f}",
            delta,
            f"{row.decode_tokens_per_second:.1f}",
            f"{row.prompt_tokens_per_second:.0f}",
        )
    return table


def _parse_levels(text: str) -> list[QuantLevel]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise PipelineError("--levels needs at least one level, e.g. Q8_0,Q6_K,Q4_K_M")
    levels = [resolve_level(n) for n in names]
    if len({lv.name for lv in levels}) != len(levels):
        raise PipelineError(f"--levels lists a level twice: {text}")
    return levels


def quantize(
    src: Annotated[
        Path,
        typer.Argument(metavar="SRC", help="source GGUF: F16/BF16/F32 (a quantized one: --allow-requantize)"),
    ],
    level: Annotated[
        str, typer.Option(help="auto, or Q8_0|Q6_K|Q5_K_M|Q4_K_M|Q4_0|Q3_K_M|Q2_K|IQ4_XS|...")
    ] = "auto",
    levels: Annotated[
        str | None, typer.Option(help="several levels (comma-separated) for the quality table")
    ] = None,
    eval_text: Annotated[
        Path | None,
        typer.Option("--eval", help="text for perplexity (default: the shipped public-domain text)"),
    ] = None,
    eval_tokens: Annotated[int | None, typer.Option(help="use at most this many tokens of the text")] = None,
    eval_ctx: Annotated[
        int, typer.Option(help="perplexity window (llama-perplexity's n_ctx)")
    ] = DEFAULT_EVAL_CTX,
    card: Annotated[
        str, typer.Option(help="card id, auto (detect) or cpu: the target of --level auto")
    ] = "auto",
    gpus: Annotated[int | None, typer.Option(help="number of GPUs (default: detected, else 1)")] = None,
    n_ctx: Annotated[int, option("n_ctx", N_CTX_HELP + " (the level must fit it)")] = 4096,
    n_parallel: Annotated[int, option("n_parallel", N_PARALLEL_HELP)] = 1,
    kv_type: Annotated[str, option("kv_type", KV_TYPE_HELP)] = "f16",
    backend: Annotated[
        str, typer.Option(help="llama-server | embedded | sglang (for the budget)")
    ] = "llama-server",
    out_path: Annotated[
        Path | None, typer.Option("--out", help="output GGUF (default: beside the source)")
    ] = None,
    out_dir: Annotated[Path | None, typer.Option(help="directory for the outputs of --levels")] = None,
    n_threads: Annotated[int, option("n_threads", "threads (0: all usable CPUs)")] = 0,
    imatrix: Annotated[
        Path | None, typer.Option(help="importance matrix (llama-imatrix GGUF or legacy .dat)")
    ] = None,
    allow_requantize: Annotated[bool, typer.Option(help="quantize an already quantized source")] = False,
    force: Annotated[bool, typer.Option(help="overwrite an existing output")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON on stdout")] = False,
) -> None:
    """Quantize a GGUF with llama.cpp (level chosen from the VRAM budget with --level auto), verify it, and
    optionally measure perplexity and speed per level on a text (--levels / --eval)."""
    options = QuantizeOptions(
        out=out_path, n_threads=n_threads, imatrix=imatrix, allow_requantize=allow_requantize, force=force
    )
    try:
        if n_threads < 0:
            raise PipelineError(f"--n-threads must be 0 or more, got {n_threads}")
        if backend not in BACKENDS:
            raise PipelineError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        spec = read_source(src)
        choice: LevelChoice | None = None
        if levels is not None:
            if level.lower() != "auto":
                raise PipelineError("give either --level or --levels, not both")
            wanted = _parse_levels(levels)
        elif level.lower() == "auto":
            target = resolve_target(card, gpus)
            choice = choose_level(
                spec,
                target,
                backend=backend,
                n_ctx=n_ctx,
                n_parallel=n_parallel,
                kv_type=kv_type,  # type: ignore[arg-type]
            )
            wanted = [choice.level]
            if not as_json:
                err.print(_choice_table(choice))
                err.print(
                    f"chose [bold]{choice.level.name}[/]: the highest-quality level that fits "
                    f"({_mib(choice.budget.headroom_bytes)} MiB left)",
                    highlight=False,
                )
        else:
            wanted = [resolve_level(level)]
        if levels is not None or eval_text is not None:
            _run_quality(src, wanted, eval_text, eval_tokens, eval_ctx, options, out_dir, as_json)
            return
        plan = prepare(src, wanted[0], options, spec=spec, choice=choice)
        with _TensorBar(f"{plan.level.name}", enabled=not as_json and err.is_terminal) as bar:
            result = execute(plan, on_progress=bar)
    except KeyboardInterrupt:
        raise _fail("interrupted; no output was left behind", code=130) from None
    except (PipelineError, NoLevelFitsError, UnknownCardError, TargetError, EvalTextTooShortError) as exc:
        raise _fail(str(exc)) from None
    except (ValueError, OSError, RuntimeError) as exc:
        raise _fail(f"{type(exc).__name__}: {exc}") from None
    if as_json:
        typer.echo(json.dumps(result.manifest.model_dump(mode="json"), indent=2))
        return
    out.print(_result_table(result))


def _run_quality(
    src: Path,
    wanted: list[QuantLevel],
    eval_text: Path | None,
    eval_tokens: int | None,
    eval_ctx: int,
    options: QuantizeOptions,
    out_dir: Path | None,
    as_json: bool,
) -> None:
    if options.out is not None:
        raise PipelineError("--out names one file; with --levels/--eval use --out-dir")
    if eval_tokens is not None and eval_tokens < eval_ctx:
        raise PipelineError(f"--eval-tokens {eval_tokens} is less than one window (--eval-ctx {eval_ctx})")
    text = eval_text or default_eval_text()
    bar = _TensorBar("quantizing", enabled=not as_json and err.is_terminal)

    def step(msg: str) -> None:
        bar.reset()
        if not as_json:
            err.print(f"[dim]{msg}[/]", highlight=False)

    with bar:
        table, results = quality_table(
            src,
            wanted,
            text,
            options,
            out_dir=out_dir,
            n_ctx=eval_ctx,
            max_tokens=eval_tokens,
            on_step=step,
            on_progress=bar,
        )
    if as_json:
        data = table.to_json()
        data["manifests"] = [str(r.manifest_path) for r in results]
        typer.echo(json.dumps(data, indent=2))
        return
    out.print(_quality_table(table))
    if table.is_indicative:
        out.print(f"[yellow]note:[/] {table.note}", highlight=False)
    for r in results:
        out.print(f"[dim]{r.manifest.level}: {r.out} (manifest {r.manifest_path.name})[/]", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("quantize")(quantize)
