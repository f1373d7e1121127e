"""`edgeserve serve`: the OpenAI-compatible gateway over the embedded engine or a remote server (uvicorn)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.console import Console

from server.gateway.settings import BackendKind, GatewaySettings

err = Console(stderr=True)


def _fail(message: str) -> typer.Exit:
    err.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code=2)


def _settings(overrides: dict[str, Any]) -> GatewaySettings:
    """EDGESERVE_* environment first, then whatever was given on the command line."""
    try:
        return GatewaySettings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "settings"
        raise _fail(f"{where}: {first.get('msg')}") from None


def _resolve_model(settings: GatewaySettings) -> GatewaySettings:
    if settings.backend != "embedded":
        return settings
    if settings.model_path is None:
        from quantize.bundled import BundledModelMissingError, default_model_path

        try:
            path = default_model_path()
        except BundledModelMissingError as exc:
            raise _fail(str(exc)) from None
        return settings.model_copy(update={"model_path": path})
    path = settings.model_path.expanduser()
    if not path.is_file():
        raise _fail(f"model file not found: {path}")
    with path.open("rb") as fh:
        if fh.read(4) != b"GGUF":
            raise _fail(f"{path} is not a GGUF file")
    return settings.model_copy(update={"model_path": path})


BackendOpt = Annotated[BackendKind | None, typer.Option(help="embedded engine or remote OpenAI server")]
ModelOpt = Annotated[Path | None, typer.Option(help="GGUF model (default: the bundled SmolLM2-135M)")]
UpstreamOpt = Annotated[str | None, typer.Option(help="llama-server / SGLang base URL (--backend openai)")]
HostOpt = Annotated[str | None, typer.Option(help="address to listen on (default 127.0.0.1)")]
PortOpt = Annotated[int | None, typer.Option(help="port (default 8000)")]
ParallelOpt = Annotated[int | None, typer.Option(help="sequences decoded together (default 4)")]
CtxOpt = Annotated[int | None, typer.Option(help="KV cache tokens for all sequences, like -c (default 4096)")]
ApiKeyOpt = Annotated[str | None, typer.Option(help="require `Authorization: Bearer KEY`")]
GpuLayersOpt = Annotated[int | None, typer.Option(help="layers on the GPU, -1 = all (default)")]
ThreadsOpt = Annotated[int | None, typer.Option(help="CPU threads of the engine (default: all cores)")]
QueueOpt = Annotated[int | None, typer.Option(help="requests queued behind busy slots (then 429)")]
NameOpt = Annotated[str | None, typer.Option(help="model id to serve (default: file name)")]
ChainOpt = Annotated[Path | None, typer.Option(help="fallback chain YAML (see configs/gateway.example.yaml)")]
LogOpt = Annotated[str, typer.Option(help="uvicorn log level")]


def serve(
    backend: BackendOpt = None,
    model: ModelOpt = None,
    upstream: UpstreamOpt = None,
    host: HostOpt = None,
    port: PortOpt = None,
    parallel: ParallelOpt = None,
    ctx: CtxOpt = None,
    api_key: ApiKeyOpt = None,
    n_gpu_layers: GpuLayersOpt = None,
    threads: ThreadsOpt = None,
    max_queue: QueueOpt = None,
    model_name: NameOpt = None,
    chain: ChainOpt = None,
    log_level: LogOpt = "info",
) -> None:
    """Serve the OpenAI API (chat, completions, models, health, ready, metrics, GPU info)."""
    settings = _settings({
        "backend": backend, "model_path": model, "upstream_url": upstream, "host": host, "port": port,
        "parallel": parallel, "ctx": ctx, "api_key": api_key, "n_gpu_layers": n_gpu_layers,
        "n_threads": threads,
        "max_queue": max_queue, "model_name": model_name, "chain_config": chain,
    })
    settings = _resolve_model(settings)
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import uvicorn

    from server.gateway.app import create_app

    try:
        app = create_app(settings)
    except ValueError as exc:
        raise _fail(str(exc)) from None
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=log_level.lower())


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)


def main() -> None:
    """`python -m server.cli.serve [OPTIONS]`: the serve command alone (no other command groups loaded)."""
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    register(app)
    app()


if __name__ == "__main__":
    main()
