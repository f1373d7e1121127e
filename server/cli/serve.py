"""`edgeserve serve`: the OpenAI-compatible gateway over the embedded engine or a remote server (uvicorn).

The engine's options are made from EngineConfig's fields, one per field and named as the field (`--n-ctx` sets
engine.n_ctx), with the field's description and default as help: they cannot drift from the engine, and the
embedded launcher renders `serve`'s argv by the same rule (server/launch/embedded.py).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from pydantic.fields import FieldInfo
from rich.console import Console

from server.cli.options import N_CTX_HELP, option
from server.engine.config import EngineConfig
from server.gateway.sampling_defaults import DEFAULT_SAMPLING_DEFAULTS, SAMPLING_DEFAULTS
from server.gateway.settings import BackendKind, GatewaySettings

err = Console(stderr=True)
# The exit status of a server whose backend failed to load (2 is a usage error).
FATAL_EXIT = 3


def _fail(message: str) -> typer.Exit:
    err.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code=2)


def build_settings(options: Mapping[str, Any]) -> GatewaySettings:
    """EDGESERVE_* environment first, then the options given (None = not given). Engine options go to
    `engine`, merged field by field with EDGESERVE_ENGINE__* variables. Raises ValidationError."""
    given = {k: v for k, v in options.items() if v is not None}
    engine = {k: given.pop(k) for k in list(given) if k in EngineConfig.model_fields}
    if engine:
        given["engine"] = engine
    return GatewaySettings(**given)


def _resolve_model(settings: GatewaySettings) -> GatewaySettings:
    """The engine's model as a checked path (the bundled model when none is given)."""
    if settings.backend != "embedded" or settings.chain_config or settings.models_file:
        return settings
    from quantize.bundled import BundledModelMissingError

    try:
        path = settings.engine.model_file()
    except BundledModelMissingError as exc:
        raise _fail(str(exc)) from None
    if not path.is_file():
        raise _fail(f"model file not found: {path}")
    with path.open("rb") as fh:
        if fh.read(4) != b"GGUF":
            raise _fail(f"{path} is not a GGUF file")
    engine = settings.engine.model_copy(update={"model_path": str(path)})
    return settings.model_copy(update={"engine": engine})


def _model_pool(settings: GatewaySettings) -> Any:
    """With a models file: the pool, its llama-server models each a supervised process (launch and gateway
    meet here). None without one."""
    if settings.models_file is None:
        return None
    from server.cli.model_processes import LlamaServerKind
    from server.gateway.models.models_file import load_models_file
    from server.gateway.models.pool import ModelPool

    try:
        # Every model's memory is planned now: a file that is missing or not a GGUF stops the server here.
        models = load_models_file(settings.models_file)
        return ModelPool.build(models, kinds={"llama-server": LlamaServerKind()})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "models"
        raise _fail(f"{settings.models_file}: {where}: {first.get('msg')}") from None
    except (OSError, ValueError) as exc:
        raise _fail(f"{settings.models_file}: {exc}") from None


def _gateway_options(
    backend: Annotated[
        BackendKind | None, typer.Option(help="embedded engine or remote OpenAI server")
    ] = None,
    upstream_url: Annotated[
        str | None,
        typer.Option("--upstream-url", "--upstream", help="llama-server / SGLang URL (--backend openai)"),
    ] = None,
    host: Annotated[str | None, typer.Option(help="address to listen on (default 127.0.0.1)")] = None,
    port: Annotated[int | None, typer.Option(help="port (default 8000)")] = None,
    api_key: Annotated[str | None, typer.Option(help="require `Authorization: Bearer KEY`")] = None,
    max_queue: Annotated[
        int | None, typer.Option(help="requests queued behind busy slots (then 429)")
    ] = None,
    model_name: Annotated[str | None, typer.Option(help="model id to serve (default: file name)")] = None,
    served_model_names: Annotated[
        list[str] | None,
        typer.Option("--served-model-name", help="a model name requests may ask for (repeat it; default: the "
                     "model id and 'edgeserve'); others get 404 model_not_found"),
    ] = None,
    tool_prompt: Annotated[
        str | None,
        typer.Option(help="tool_choice auto on a model whose chat template cannot render tools: model "
                     "(a 400) or generic (edgeserve's own tool prompt)"),
    ] = None,
    upstream_dialect: Annotated[
        str | None,
        typer.Option(help="--backend openai: auto, edgeserve, llama-server, sglang, llama-cpp-python or "
                     "openai"),
    ] = None,
    chain_config: Annotated[
        Path | None,
        typer.Option(
            "--chain-config", "--chain", help="fallback chain YAML (see server/gateway/chain.example.yaml)"
        ),
    ] = None,
    models_file: Annotated[
        Path | None,
        typer.Option("--models-file", "--models",
                     help="models file YAML (see server/gateway/models.example.yaml): several models behind "
                     "this port, routed by the request's model, loaded and evicted by the memory plan"),
    ] = None,
    sampling_defaults: Annotated[
        str | None,
        typer.Option(help=f"values for sampling fields a request leaves out: {' | '.join(SAMPLING_DEFAULTS)} "
                     f"(default: {DEFAULT_SAMPLING_DEFAULTS}; see the README's API section)"),
    ] = None,
    shutdown_grace_s: Annotated[
        float | None,
        typer.Option(help="on SIGTERM, seconds for requests in flight before their streams end (default 30)"),
    ] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level")] = "info",
) -> None:
    """The gateway's own options (the signature is read; the function never runs)."""


def _engine_help(name: str, field: FieldInfo) -> str:
    """The field's description and its default (a None default is described by the field itself)."""
    text = N_CTX_HELP if name == "n_ctx" else field.description or name
    return text if field.default is None else f"{text} (default: {field.default})"


def engine_parameters() -> list[inspect.Parameter]:
    """One `serve` option per EngineConfig field: `--<field-name>`, None when not given."""
    params = []
    for name, field in EngineConfig.model_fields.items():
        is_bool = field.annotation in (bool, bool | None)
        opt = option(name, _engine_help(name, field), is_bool=is_bool)
        annotation = Annotated[field.annotation | None, opt]  # type: ignore[name-defined]
        kind = inspect.Parameter.KEYWORD_ONLY
        params.append(inspect.Parameter(name, kind, default=None, annotation=annotation))
    return params


def serve(**options: Any) -> None:
    """Serve the OpenAI API (chat, completions, models, health, ready, metrics, GPU info)."""
    log_level = options.pop("log_level")
    try:
        settings = build_settings(options)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "settings"
        raise _fail(f"{where}: {first.get('msg')}") from None
    settings = _resolve_model(settings)
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from server.gateway import shutdown
    from server.gateway.app import create_app

    try:
        app = create_app(settings, backend=_model_pool(settings))
    except ValueError as exc:
        raise _fail(str(exc)) from None
    fatal = shutdown.run(app, app.state.gateway, host=settings.host, port=settings.port,
                         log_level=log_level.lower())
    if fatal is not None:
        err.print(f"[red]error:[/red] the model failed to load: {fatal}", highlight=False, soft_wrap=True)
        raise typer.Exit(code=FATAL_EXIT)


_GATEWAY = [
    p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
    for p in inspect.signature(_gateway_options, eval_str=True).parameters.values()
]
# typer reads the command's options from its signature: the gateway's own, then one per engine field.
serve.__signature__ = inspect.Signature([*_GATEWAY, *engine_parameters()])  # type: ignore[attr-defined]


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)


def _app() -> typer.Typer:
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    register(app)
    return app


def settings_from_argv(argv: Sequence[str]) -> GatewaySettings:
    """The settings `edgeserve serve ARGV` would run with: parsed by serve's own options, then built by
    build_settings (nothing is started). Raises click's UsageError or pydantic's ValidationError."""
    command = typer.main.get_command(_app())
    with command.make_context("serve", list(argv)) as ctx:
        options = dict(ctx.params)
    options.pop("log_level", None)
    return build_settings(options)


def main() -> None:
    """`python -m server.cli.serve [OPTIONS]`: the serve command alone (no other command groups loaded)."""
    _app()()


if __name__ == "__main__":
    main()
