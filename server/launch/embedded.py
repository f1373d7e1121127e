"""Embedded arg builder: the gateway with its in-process engine, `edgeserve serve --backend embedded ...`.

The plan holds the same llama.cpp settings as llama-server's, under the engine's own field names, so the
engine's settings are read straight off the plan (`engine_config`) and `serve`'s argv is rendered from
EngineConfig's fields: each field that differs from its default becomes `--<field-name> VALUE` (`serve` has
one option per field, spelt that way). There is no table of names or defaults here to drift from the engine's.
"""

from __future__ import annotations

from server.engine.config import EngineConfig
from server.launch.context import BuildContext, ReasonLog
from server.launch.llama_server import llama_plan_fields, resolve_llama_settings
from server.launch.plan import LaunchPlan
from server.launch.resolve import PlanError, gpu_env, pick_port, plan_identity

NAME = "embedded"
DEFAULT_PORT = 8000
HEALTH_PATH = "/ready"


def refusal(ctx: BuildContext) -> str | None:
    if not ctx.model_path.endswith(".gguf"):
        return f"the embedded engine loads GGUF files; {ctx.model_path} is not one"
    return None


def build(ctx: BuildContext) -> LaunchPlan:
    why_not = refusal(ctx)
    if why_not:
        raise PlanError(why_not)
    log = ReasonLog()
    settings = resolve_llama_settings(ctx, log, backend="embedded")
    port = pick_port(ctx, DEFAULT_PORT, "the gateway", log)
    prefix, prefix_source = ctx.setting("prefix_cache")
    if not prefix:
        log.add("prefix_cache", False, prefix_source, "no reuse of finished sequences' prompt cells")
    plan = LaunchPlan(
        backend=NAME,
        program=(*ctx.toolchain.edgeserve, "serve"),
        **plan_identity(ctx, port, HEALTH_PATH),
        **llama_plan_fields(settings),
        prefix_cache=bool(prefix),
        api_key=ctx.request.api_key,
        reasons=log.freeze(),
    )
    return finish(plan)  # rendering builds the EngineConfig: a plan the engine would refuse is a PlanError


def engine_config(plan: LaunchPlan) -> EngineConfig:
    """The engine's settings this plan asks for: every EngineConfig field the plan has, same name."""
    values = {
        name: getattr(plan, name)
        for name in EngineConfig.model_fields
        if name in LaunchPlan.model_fields and getattr(plan, name) is not None
    }
    try:
        return EngineConfig(**values)
    except ValueError as exc:
        raise PlanError(f"the embedded engine cannot take this plan: {exc}") from None


def option_args(name: str, value: object) -> list[str]:
    """A setting as edgeserve's commands take it: `--n-ctx 4096`, a bool `--kv-unified` / `--no-...`."""
    option = "--" + name.replace("_", "-")
    if isinstance(value, bool):
        return [option if value else "--no-" + name.replace("_", "-")]
    return [option, str(value)]


def serve_options(config: EngineConfig) -> list[str]:
    """`edgeserve serve` options for the fields of `config` that differ from EngineConfig's defaults."""
    args: list[str] = []
    for name, field in EngineConfig.model_fields.items():
        value = getattr(config, name)
        if value != field.default:
            args += option_args(name, value)
    return args


def finish(plan: LaunchPlan) -> LaunchPlan:
    """Render argv and the environment from the plan's fields (the ladder calls it after each step)."""
    return plan.model_copy(update={"env": gpu_env(plan.gpus, plan.card), "argv": render(plan)})


def render(plan: LaunchPlan) -> tuple[str, ...]:
    """argv for `plan`: `edgeserve serve` with the gateway's address and the engine's settings."""
    args = [*plan.program, "--backend", NAME, "--host", plan.host, "--port", str(plan.port),
            "--shutdown-grace-s", f"{plan.shutdown_grace_s:g}"]
    args += serve_options(engine_config(plan))
    if plan.api_key:
        args += ["--api-key", plan.api_key]
    if plan.model_name:
        args += ["--model-name", plan.model_name]
    return tuple(args)
