"""`edgeserve tune run|report|apply|forget`: measure settings under load, report, keep the winner if asked.

`run` finds n_parallel, n_ctx, n_batch and n_ubatch for this card and prints the winner with the
`edgeserve launch` flags that reproduce it. It keeps nothing on the machine unless `--save` makes the winner
the card's tuned profile, which every later `edgeserve launch` on the card uses: a tune over a few settings,
or on a busy machine, must not decide later launches unasked. `apply` keeps a finished tune's winner from its
results.json; `forget` removes the tuned profile.

Every setting is planned by the launcher (the backend it would pick, or --backend), skipped when the VRAM
calculator says it does not fit, started under the supervisor, warmed up, loaded with Locust and stopped. The
search (loadtest/search.py) measures a fraction of the grid; `--strategy both` runs the grid too, to show what
the search saved. Results go to --out: results.json, report.md with its two PNGs, per setting its plan, server
log and Locust CSVs; `--json` prints the answer on stdout; `report` re-renders from results.json.
"""

from __future__ import annotations

import json
import logging
import platform
import signal
import sys
from datetime import date, datetime
from pathlib import Path
from typing import Annotated, Literal

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from loadtest.result import TuneResult, summary_json
from loadtest.runner import BenchConfig, LaunchBench
from loadtest.search import Space, efficiency, run_strategy
from loadtest.selection import Slo, goodput
from loadtest.tuned import NoWinnerError, forget_tuned_profile, save_winner, tuned_profile_path
from loadtest.workload import Workload
from server.hardware.target import GpuSet, resolve_target
from server.launch.profile import FORGET_TUNED, load_profile
from server.launch.registry import backend_choices
from server.launch.request import LaunchRequest

log = logging.getLogger(__name__)
err = Console(stderr=True)
StrategyChoice = Literal["search", "grid", "both"]


def parse_int_list(text: str, what: str) -> tuple[int, ...]:
    """'1,2,4,8' -> (1, 2, 4, 8); a clear error for anything else."""
    values: list[int] = []
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        try:
            value = int(part)
        except ValueError:
            raise ValueError(f"{what}: {part!r} is not a whole number (expected e.g. 1,2,4,8)") from None
        if value < 1:
            raise ValueError(f"{what}: values must be at least 1, got {value}")
        values.append(value)
    if not values:
        raise ValueError(f"{what}: give at least one value")
    return tuple(values)


def _fail(message: str) -> typer.Exit:
    err.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True, markup=True)
    return typer.Exit(code=2)


def _machine(bench: LaunchBench) -> str:
    target = bench.target
    if isinstance(target, GpuSet):
        return f"{target.count} x {target.card.name} ({target.card.id})"
    return f"CPU ({platform.processor() or platform.machine()}, {bench.toolchain.cpu_threads} threads usable)"


def _show(result: TuneResult, console: Console) -> None:
    table = Table(title=f"edgeserve tune: {result.backend} on {result.card}", title_justify="left")
    for name in ("setting", "runs", "goodput req/s", "tokens/s", "TTFT p95 ms", "memory MiB", ""):
        table.add_column(name, justify="left" if name in ("setting", "") else "right")
    best = result.choice.best
    for t in result.trials():
        peak = t.peak
        mark = "[bold green]chosen[/]" if best is not None and t.setting == best.setting else (
            (t.failure or "").splitlines()[0][:60] if t.failure else "")
        table.add_row(t.setting.label, str(t.runs), f"{goodput(t, result.slo):.3g}",
                      f"{peak.tokens_per_s:.1f}" if peak else "-",
                      f"{peak.ttft_p95_ms:.0f}" if peak and peak.ttft_p95_ms is not None else "-",
                      f"{t.memory_bytes / 2**20:,.0f}" if t.memory_bytes else "-", mark)
    if table.row_count:
        console.print(table)
    skipped = result.skipped()
    if skipped and result.trials():  # with nothing tried, the choice's reason lists them
        console.print(f"not started ({len(skipped)}): " + "; ".join(f"{k.setting.label}: {k.why}"
                                                                   for k in skipped), highlight=False)
    console.print(result.choice.reason, highlight=False)
    if result.efficiency:
        e = result.efficiency
        console.print(f"search: {e.search_runs} runs, grid: {e.grid_runs} ({e.runs_ratio:.0%}); goodput "
                      f"{e.goodput_ratio:.1%} of the grid's best", highlight=False)


def _write(result: TuneResult, out_dir: Path, title: str, context: str) -> dict[str, str]:
    try:
        from loadtest.report import write_report
    except ImportError as exc:
        raise _fail(f"reports need the loadtest extra: pip install 'edgeserve[loadtest]' ({exc})") from None
    results = out_dir / "results.json"
    results.write_text(result.model_dump_json(indent=2) + "\n", encoding="utf-8")
    files = write_report(result, out_dir, title=title, context=context)
    return {"results": str(results), "report": str(files.markdown), "plots": ",".join(map(str, files.plots))}


def _keep(result: TuneResult, console: Console) -> None:
    """What to do with the winner: the flags that run it, and whether it is now the card's tuned profile."""
    command = result.launch_command()
    if command is None:
        return
    console.print(f"run the winner: {command}", highlight=False, soft_wrap=True, markup=False)
    if result.profile_path:
        console.print(f"saved as the {result.card} tuned profile: {result.profile_path} (every `edgeserve "
                      f"launch` on this card uses it; undo: {FORGET_TUNED} --card {result.card})",
                      highlight=False, soft_wrap=True, markup=False)
    else:
        results = Path(result.bench.out_dir) / "results.json"
        console.print(f"not saved: `edgeserve tune apply {results}` makes it this card's tuned profile (or "
                      "run with --save)", highlight=False, soft_wrap=True, markup=False)


def _read(results: Path) -> TuneResult:
    try:
        return TuneResult.model_validate_json(results.read_text(encoding="utf-8"))
    except OSError as exc:
        raise _fail(f"cannot read {results}: {exc.strerror}") from None
    except ValidationError as exc:
        raise _fail(f"{results} is not a tune results file: {exc.errors()[0].get('msg')}") from None


TUNED_DIR_HELP = "tuned profiles folder (default: EDGESERVE_TUNED_DIR, else XDG_CONFIG_HOME/edgeserve/tuned)"
app = typer.Typer(name="tune", help="Load-test settings with Locust, pick the best, keep it if asked.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


@app.command("run")
def run_command(
    backend: Annotated[str, typer.Option(help="backend: " + ", ".join(backend_choices()))] = "auto",
    card: Annotated[str, typer.Option(help="card id, 'cpu', or auto (detect)")] = "auto",
    gpus: Annotated[int | None, typer.Option(min=0, help="GPUs to use (default: all like GPU 0)")] = None,
    model_path: Annotated[Path | None, typer.Option("--model-path", "--model",
                                                    help="GGUF file or HF folder (default: bundled)")] = None,
    n_parallel: Annotated[str, typer.Option("--n-parallel", "--parallel",
                                            help="n_parallel values to try, comma separated")] = "1,2,4,8",
    n_ctx: Annotated[str, typer.Option("--n-ctx", "--ctx", help="n_ctx values (context of ONE sequence)")
                     ] = "2048",
    n_batch: Annotated[str | None, typer.Option(
        "--n-batch", help="n_batch values (llama.cpp -b, SGLang prefill chunk); default: the profile's")
    ] = None,
    n_ubatch: Annotated[str | None, typer.Option(
        "--n-ubatch", "--ubatch", help="n_ubatch values (-ub); default: the profile's")] = None,
    n_threads: Annotated[int | None, typer.Option("--n-threads", "--threads", min=1,
                                                  help="CPU threads (fixed for every setting)")] = None,
    n_gpu_layers: Annotated[int | None, typer.Option("--n-gpu-layers", help="layers on the GPU")] = None,
    kv_type: Annotated[str | None, typer.Option("--kv-type", help="KV cache type (fixed)")] = None,
    strategy: Annotated[StrategyChoice, typer.Option(help="search, grid, or both (the grid proves the "
                                                          "search)")] = "search",
    duration: Annotated[int, typer.Option(help="seconds of load per load point", min=1)] = 30,
    drain: Annotated[int, typer.Option(help="seconds running requests get to finish after a run",
                                       min=0)] = 30,
    warmup: Annotated[int, typer.Option(help="unmeasured requests after each start", min=0)] = 1,
    rate_steps: Annotated[int, typer.Option(help="rate bisection rounds when a setting misses the SLOs",
                                            min=0)] = 3,
    max_ttft_p95_ms: Annotated[float | None, typer.Option(help="SLO: TTFT p95 limit")] = None,
    max_itl_p95_ms: Annotated[float | None, typer.Option(help="SLO: inter-token latency p95 limit")] = None,
    max_e2e_p95_ms: Annotated[float | None, typer.Option(help="SLO: end-to-end latency p95 limit")] = None,
    max_error_rate: Annotated[float, typer.Option(help="SLO: error rate (0..1)", min=0.0, max=1.0)] = 0.01,
    mix: Annotated[str, typer.Option(help="request kinds and weights: chat-stream, chat, completion-stream, "
                                          "completion, e.g. chat-stream:3,completion:1")] = "chat-stream",
    prompt_lengths: Annotated[str, typer.Option(help="shipped prompts: short, medium, long, xlong "
                                                     "(two long ones, about 1,000-1,300 tokens)")
                              ] = "short,medium,long",
    max_prompt_tokens: Annotated[int, typer.Option(help="leave out longer shipped prompts", min=16)] = 1024,
    max_tokens: Annotated[int, typer.Option(help="tokens generated per request", min=1)] = 64,
    ignore_eos: Annotated[bool, typer.Option(help="always generate max_tokens")] = True,
    temperature: Annotated[float, typer.Option(min=0.0, max=2.0)] = 0.7,
    sampling: Annotated[Literal["fixed", "varied"], typer.Option(
        help="fixed: every request --temperature and top_p 0.95; varied: each request its own temperature, "
             "top_p and sometimes top_k, min_p and penalties, as many clients send")] = "fixed",
    api_key: Annotated[str | None, typer.Option(help="API key the backends are started with")] = None,
    out: Annotated[Path | None, typer.Option(help="folder for everything the tune writes")] = None,
    save: Annotated[bool, typer.Option(
        "--save", help="make the winner this card's tuned profile, which every later `edgeserve launch` on "
                       "it uses (default: only report it; `edgeserve tune apply` keeps it later)")] = False,
    tuned_dir: Annotated[Path | None, typer.Option(help=TUNED_DIR_HELP)] = None,
    title: Annotated[str, typer.Option(help="report title")] = "edgeserve tune",
    context: Annotated[str, typer.Option(help="a line under the title (default: date, machine, model)")] = "",
    as_json: Annotated[bool, typer.Option("--json", help="print the answer as JSON on stdout")] = False,
) -> None:
    """Measure settings under load, choose the best; --save keeps it as the card's tuned profile."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s",
                        stream=sys.stderr)
    if tuned_dir is not None and not save:
        raise _fail("--tuned-dir says where --save writes the tuned profile: give --save too, or leave both "
                    "out (the winner is reported either way, and `edgeserve tune apply` keeps it later)")
    console = err if as_json else Console()
    try:
        request = LaunchRequest(backend=backend, card=card, gpus=gpus,
                                model_path=str(model_path) if model_path else None, n_threads=n_threads,
                                n_gpu_layers=n_gpu_layers, kv_type=kv_type, api_key=api_key)
        workload = Workload(mix=mix, prompt_lengths=prompt_lengths, max_prompt_tokens=max_prompt_tokens,
                            max_tokens=max_tokens, ignore_eos=ignore_eos, temperature=temperature,
                            sampling=sampling, api_key=api_key)
        out_dir = out or Path("loadtest-results") / datetime.now().strftime("tune-%Y%m%d-%H%M%S")
        bench_config = BenchConfig(request=request, workload=workload, duration_s=duration, drain_s=drain,
                                   warmup_requests=warmup, rate_steps=rate_steps, out_dir=out_dir)
        slo = Slo(max_ttft_p95_ms=max_ttft_p95_ms, max_itl_p95_ms=max_itl_p95_ms,
                  max_e2e_p95_ms=max_e2e_p95_ms, max_error_rate=max_error_rate)
        bench = LaunchBench(bench_config, slo)
        profile = load_profile(bench.target.card_id).profile
        space = Space(n_parallel=parse_int_list(n_parallel, "--n-parallel"),
                      n_ctx=parse_int_list(n_ctx, "--n-ctx"),
                      n_batch=parse_int_list(n_batch, "--n-batch") if n_batch else (profile.n_batch,),
                      n_ubatch=parse_int_list(n_ubatch, "--n-ubatch") if n_ubatch else (profile.n_ubatch,))
        first = bench.plan(space.grid()[0])  # fail fast on a backend or model that cannot run at all
    except ValidationError as exc:
        problem = exc.errors()[0]
        where = ".".join(str(p) for p in problem.get("loc", ()))
        message = str(problem.get("msg")).removeprefix("Value error, ")
        raise _fail(f"{where}: {message}" if where else message) from None
    except ValueError as exc:
        raise _fail(str(exc)) from None
    out_dir.mkdir(parents=True, exist_ok=True)
    # SIGTERM unwinds like Ctrl-C, so the running setting's backend is stopped (the runner's `finally`), never
    # left behind.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    strategies: tuple[Literal["search", "grid"], ...] = (
        ("search", "grid") if strategy == "both" else (strategy,))
    results = {}
    columns = (SpinnerColumn(), TextColumn("{task.description}"), TextColumn("[bold]{task.completed} runs"),
               TimeElapsedColumn())
    with Progress(*columns, console=err, transient=False) as progress:
        task = progress.add_task("planning", total=None)

        def on_progress(text: str, run_done: bool) -> None:
            progress.update(task, description=text, advance=1 if run_done else 0)

        bench._progress = on_progress
        for name in strategies:
            progress.update(task, description=f"{name}: checking what fits")
            results[name] = run_strategy(name, space, bench.check, bench.measure, slo)
    search, grid = results.get("search"), results.get("grid")
    today = date.today().isoformat()
    result = TuneResult(
        date=today, machine=_machine(bench), card=bench.target.card_id, backend=first.backend,
        model=Path(first.model_path).name, space=space, slo=slo,
        bench=bench_config.model_copy(update={"request": request.model_copy(update={"api_key": None}),
                                              "workload": workload.model_copy(update={"api_key": None})}),
        search=search, grid=grid, efficiency=efficiency(search, grid, slo) if search and grid else None)
    if save and result.choice.best is not None:
        result = result.model_copy(update={"profile_path": str(save_winner(result, tuned_dir))})
    files = _write(result, out_dir, title, context)
    _show(result, console)
    console.print(f"report: {files['report']}", highlight=False)
    _keep(result, console)
    if as_json:
        typer.echo(json.dumps(summary_json(result, files), indent=2))
    if result.choice.best is None:
        raise typer.Exit(code=1)


@app.command("report")
def report_command(
    results: Annotated[Path, typer.Argument(help="results.json written by `run`")],
    out: Annotated[Path | None, typer.Option(help="folder for report.md and its PNGs (default: beside it)")
                   ] = None,
    title: Annotated[str, typer.Option(help="report title")] = "edgeserve tune",
    context: Annotated[str, typer.Option(help="a line under the title")] = "",
    stem: Annotated[str, typer.Option(help="file name of the report and its plots, no suffix")] = "report",
) -> None:
    """Re-render report.md and its plots from results.json."""
    result = _read(results)
    from loadtest.report import write_report

    files = write_report(result, out or results.parent, stem=stem, title=title, context=context)
    _show(result, Console())
    Console().print(f"report: {files.markdown}", highlight=False)


@app.command("apply")
def apply_command(
    results: Annotated[Path, typer.Argument(help="results.json written by `run`")],
    tuned_dir: Annotated[Path | None, typer.Option(help=TUNED_DIR_HELP)] = None,
) -> None:
    """Make a finished tune's winner its card's tuned profile (what `run --save` would have written)."""
    result = _read(results)
    try:
        path = save_winner(result, tuned_dir)
    except NoWinnerError as exc:
        raise _fail(f"{results}: {exc}") from None
    except ValueError as exc:  # a value the launcher would refuse (a results file edited by hand)
        raise _fail(f"{results}: the winner is not a valid profile: {exc}") from None
    typer.echo(f"wrote {path}: every `edgeserve launch` on {result.card} now runs the winner of the tune on "
               f"{result.date} (undo: {FORGET_TUNED} --card {result.card})")


@app.command("forget")
def forget_command(
    card: Annotated[str, typer.Option(help="card id, 'cpu', or auto (detect)")] = "auto",
    tuned_dir: Annotated[Path | None, typer.Option(help=TUNED_DIR_HELP)] = None,
) -> None:
    """Remove the card's tuned profile: `edgeserve launch` goes back to the packaged profile."""
    try:
        card_id = resolve_target(card).card_id
    except ValueError as exc:
        raise _fail(str(exc)) from None
    path = tuned_profile_path(card_id, tuned_dir)
    if forget_tuned_profile(path):
        typer.echo(f"removed {path}: `edgeserve launch` on {card_id} uses the packaged profile again")
    else:
        typer.echo(f"no tuned profile for {card_id} ({path} does not exist): nothing to remove")


def register(cli: typer.Typer) -> None:
    """Add this group as `edgeserve tune` (run / report / apply / forget)."""
    cli.add_typer(app, name="tune")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
