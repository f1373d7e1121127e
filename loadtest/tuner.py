"""Sweep n_parallel and n_ctx under load and pick the best setting: `python -m loadtest.tuner run ...`.

For every (n_parallel, n_ctx) pair (n_ctx per sequence, as everywhere in edgeserve) the tuner starts
`edgeserve serve` (or any server command given with --server-cmd, e.g. llama-server) on a free loopback
port, waits for it to be ready, runs Locust headless for a fixed time, stops the server and records
throughput, TTFT p50/p95 and the error rate. The chosen setting is the highest-throughput one that meets the
TTFT p95 and error-rate limits. Results go to results.json, a
markdown report and a PNG; `report` re-renders them from results.json.
"""

from __future__ import annotations

import importlib.util
import logging
import shlex
import sys
from datetime import datetime
from pathlib import Path
from typing import Annotated

import typer
from pydantic import BaseModel, ConfigDict, ValidationError
from rich.console import Console
from rich.table import Table

from loadtest.runner import DEFAULT_SERVER_TEMPLATE, RunConfig, render_command, run_trial
from loadtest.selection import Choice, Constraint, Setting, Trial, choose, expand_grid, fits_request
from loadtest.workload import Workload

log = logging.getLogger(__name__)
console = Console()
err = Console(stderr=True)
# The chat template wraps the prompt in a few tokens of its own; leave room for them when checking fit.
TEMPLATE_TOKENS = 32


class TuneResult(BaseModel):
    """Everything one sweep produced, as written to results.json."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    config: RunConfig
    constraint: Constraint
    trials: tuple[Trial, ...]
    choice: Choice


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


def sweep(settings: tuple[Setting, ...], config: RunConfig) -> tuple[Trial, ...]:
    """Run every setting in turn (one server at a time: they would compete for the same GPU)."""
    need = config.workload.prompt_tokens + config.workload.max_tokens + TEMPLATE_TOKENS
    trials: list[Trial] = []
    for index, setting in enumerate(settings, start=1):
        if not fits_request(setting, need):
            why = f"a request needs about {need} tokens, a sequence gets {setting.n_ctx}"
            trials.append(Trial(setting=setting, users=config.users, failure=why))
            continue
        log.info("[%d/%d] %s", index, len(settings), setting.label)
        trials.append(run_trial(setting, config))
    return tuple(trials)


def _print_table(result: TuneResult) -> None:
    table = Table(title="edgeserve tuning")
    for name in ("n_parallel", "n_ctx", "ok", "failed", "tokens/s", "TTFT p50 ms", "TTFT p95 ms", "verdict"):
        table.add_column(name, justify="left" if name == "verdict" else "right")
    verdicts = {v.setting: v for v in result.choice.verdicts}
    best = result.choice.best.setting if result.choice.best else None
    for trial in result.trials:
        s = trial.summary
        v = verdicts.get(trial.setting)
        note = "[bold green]chosen[/]" if trial.setting == best else ("ok" if v and v.is_feasible else
                                                                      "; ".join(v.reasons if v else ()))
        cells = (["-"] * 5 if s is None else
                 [str(s.requests_ok), str(s.requests_failed), f"{s.tokens_per_s:.1f}",
                  "-" if s.ttft_p50_ms is None else f"{s.ttft_p50_ms:.0f}",
                  "-" if s.ttft_p95_ms is None else f"{s.ttft_p95_ms:.0f}"])
        table.add_row(str(trial.setting.n_parallel), str(trial.setting.n_ctx), *cells, note[:120])
    console.print(table)
    console.print(result.choice.reason)


def _write_report(result: TuneResult, report: Path, title: str, context: str) -> None:
    try:
        from loadtest.report import write_report
    except ImportError as exc:
        raise ValueError(f"reports need the loadtest extra: pip install 'edgeserve[loadtest]' ({exc})"
                         ) from None
    cfg = result.config
    files = write_report(result.trials, result.choice, result.constraint, workload=cfg.workload,
                         users=cfg.users, duration_s=cfg.duration_s, out_dir=report.parent,
                         stem=report.stem, title=title, context=context)
    console.print(f"report: {files.markdown}  plot: {files.plot}")


def _fail(message: str) -> typer.Exit:
    err.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code=2)


app = typer.Typer(name="tune", help="Load-test settings with Locust and pick the best.", no_args_is_help=True,
                  add_completion=False, pretty_exceptions_enable=False)


@app.command("run")
def run_command(
    n_parallel: Annotated[str, typer.Option(
        "--n-parallel", "--parallel", help="n_parallel values to try, comma separated")] = "1,2,4,8",
    n_ctx: Annotated[str, typer.Option(
        "--n-ctx", "--ctx", help="n_ctx values to try (context of ONE sequence, tokens)")] = "4096",
    users: Annotated[int | None, typer.Option(help="concurrent users for every setting (default: the "
                                                   "largest n_parallel)", min=1)] = None,
    duration: Annotated[int, typer.Option(help="seconds of load per setting", min=1)] = 30,
    prompt_tokens: Annotated[int, typer.Option(help="approximate prompt length", min=1)] = 64,
    max_tokens: Annotated[int, typer.Option(help="tokens to generate per request", min=1)] = 64,
    max_ttft_p95_ms: Annotated[float | None, typer.Option(help="TTFT p95 limit for the chosen one")] = None,
    max_error_rate: Annotated[float, typer.Option(help="error-rate limit (0..1)", min=0.0, max=1.0)] = 0.01,
    model: Annotated[Path | None, typer.Option(help="GGUF to serve (default: the server's default)")] = None,
    server_cmd: Annotated[str | None, typer.Option(
        help="server command template with {host} {port} {n_parallel} {n_ctx} {n_ctx_total} {model} {python} "
             "(llama-server: -np {n_parallel} -c {n_ctx_total}); default: edgeserve serve")] = None,
    server_args: Annotated[str, typer.Option(
        help="more arguments for every server start, e.g. \"--n-threads 1\" or \"--n-gpu-layers 20\"")] = "",
    ready_path: Annotated[str, typer.Option(help="answers 200 once the server is ready")] = "/ready",
    ready_timeout: Annotated[float, typer.Option(help="seconds to wait for readiness", min=1)] = 300.0,
    stream: Annotated[bool, typer.Option(help="stream responses (needed for TTFT)")] = True,
    ignore_eos: Annotated[bool, typer.Option(help="generate exactly max_tokens every time")] = True,
    served_model: Annotated[str | None, typer.Option(help="model id to send (default: first listed)")] = None,
    api_key: Annotated[str | None, typer.Option(help="bearer token for the server")] = None,
    warmup: Annotated[int, typer.Option(help="unmeasured requests before each run", min=0)] = 1,
    drain: Annotated[int, typer.Option(help="seconds running requests get to finish after each run (they "
                                            "count for latency and errors, not throughput)", min=0)] = 60,
    out: Annotated[Path | None, typer.Option(help="folder for logs, CSVs and results.json")] = None,
    report: Annotated[Path | None, typer.Option(help="markdown report path (PNG next to it); "
                                                     "default OUT/report.md")] = None,
    title: Annotated[str, typer.Option(help="report title")] = "edgeserve tuning",
    context: Annotated[str, typer.Option(help="a line under the title: machine, model, backend")] = "",
) -> None:
    """Sweep settings under load and choose the best one."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per readiness poll otherwise
    try:
        settings = expand_grid(parse_int_list(n_parallel, "--n-parallel"), parse_int_list(n_ctx, "--n-ctx"))
        template = (tuple(shlex.split(server_cmd)) if server_cmd else DEFAULT_SERVER_TEMPLATE) + tuple(
            shlex.split(server_args))
        out_dir = out or Path("loadtest-results") / datetime.now().strftime("tune-%Y%m%d-%H%M%S")
        workload = Workload(prompt_tokens=prompt_tokens, max_tokens=max_tokens, stream=stream,
                            ignore_eos=ignore_eos, model=served_model, api_key=api_key)
        config = RunConfig(server_template=template, model=model, ready_path=ready_path,
                           ready_timeout_s=ready_timeout, users=users or max(s.n_parallel for s in settings),
                           duration_s=duration, workload=workload, warmup_requests=warmup, drain_s=drain,
                           out_dir=out_dir)
        constraint = Constraint(max_ttft_p95_ms=max_ttft_p95_ms, max_error_rate=max_error_rate)
        # Fail fast on a bad template, before any server starts.
        render_command(template, settings[0], host=config.host, port=1, model=model)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "option"
        raise _fail(f"{where}: {first.get('msg')}") from None
    except ValueError as exc:
        raise _fail(str(exc)) from None
    if model is not None and not model.is_file():
        raise _fail(f"model file not found: {model}")
    if importlib.util.find_spec("locust") is None:
        raise _fail("the tuner runs Locust, which is not installed: pip install 'edgeserve[loadtest]'")
    out_dir.mkdir(parents=True, exist_ok=True)
    trials = sweep(settings, config)
    result = TuneResult(config=config, constraint=constraint, trials=trials,
                        choice=choose(trials, constraint))
    (out_dir / "results.json").write_text(result.model_dump_json(indent=2) + "\n", encoding="utf-8")
    _print_table(result)
    try:
        _write_report(result, report or out_dir / "report.md", title, context)
    except ValueError as exc:
        raise _fail(str(exc)) from None
    if result.choice.best is None:
        raise typer.Exit(code=1)


@app.command("report")
def report_command(
    results: Annotated[Path, typer.Argument(help="results.json written by `run`")],
    report: Annotated[Path, typer.Option(help="markdown report path (PNG next to it)")] = Path("report.md"),
    title: Annotated[str, typer.Option(help="report title")] = "edgeserve tuning",
    context: Annotated[str, typer.Option(help="a line under the title: machine, model, backend")] = "",
    max_ttft_p95_ms: Annotated[float | None, typer.Option(help="re-judge with this latency limit")] = None,
) -> None:
    """Re-render the report (and optionally re-choose under another TTFT limit) from results.json."""
    try:
        result = TuneResult.model_validate_json(results.read_text(encoding="utf-8"))
    except OSError as exc:
        raise _fail(f"cannot read {results}: {exc.strerror}") from None
    except ValidationError as exc:
        raise _fail(f"{results} is not a tuner results file: {exc.errors()[0].get('msg')}") from None
    if max_ttft_p95_ms is not None:
        constraint = result.constraint.model_copy(update={"max_ttft_p95_ms": max_ttft_p95_ms})
        result = result.model_copy(update={"constraint": constraint,
                                           "choice": choose(result.trials, constraint)})
    _print_table(result)
    try:
        _write_report(result, report, title, context)
    except ValueError as exc:
        raise _fail(str(exc)) from None


def register(cli: typer.Typer) -> None:
    """Add this group as `edgeserve tune` (run / report)."""
    cli.add_typer(app, name="tune")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
