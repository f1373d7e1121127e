"""Embedded arg builder: the gateway with its in-process engine, `edgeserve serve --backend embedded ...`.

The same llama.cpp settings as llama-server, passed as `edgeserve serve` flags where it has one (--model,
--host, --port, --parallel, --ctx, --n-gpu-layers, --api-key) and otherwise as the EDGESERVE_* variables the
gateway's settings read; a setting the gateway has no field for is left at the engine's default (the plan's
reasons say so), never sent under a name nothing reads. `edgeserve serve --ctx` is the KV cache shared by
all sequences (like llama-server's -c), so it gets the plan's n_ctx_total.
"""

from __future__ import annotations

import dataclasses

from server.gateway.settings import GatewaySettings
from server.launch.context import BuildContext, ReasonLog
from server.launch.llama_server import llama_plan_fields, resolve_llama_settings
from server.launch.plan import LaunchPlan, Scalar
from server.launch.resolve import PlanError, gpu_env, pick_port, plan_identity

NAME = "embedded"
DEFAULT_PORT = 8000
HEALTH_PATH = "/ready"

# The engine's defaults (server/engine/config.py EngineConfig) for profile keys the gateway may not pass on.
ENGINE_DEFAULTS: dict[str, Scalar] = {
    "kv_cache_dtype": "f16",
    "flash_attn": "auto",
    "ubatch_size": 512,
    "kv_unified": True,
    "threads": None,
}
_PROFILE_TO_GATEWAY = {
    "kv_cache_dtype": "kv_type",
    "flash_attn": "flash_attn",
    "ubatch_size": "n_ubatch",
    "kv_unified": "kv_unified",
    "threads": "threads",
}
# plan field -> the gateway setting (EDGESERVE_<NAME>) that carries it, when the gateway has that field.
_ENV_FIELDS = {
    "batch_size": "n_batch",
    "ubatch_size": "n_ubatch",
    "kv_type": "kv_type",
    "flash_attn": "flash_attn",
    "threads": "threads",
    "kv_unified": "kv_unified",
}


def refusal(ctx: BuildContext) -> str | None:
    if not ctx.model_path.endswith(".gguf"):
        return f"the embedded engine loads GGUF files; {ctx.model_path} is not one"
    return None


def gateway_reads(setting: str) -> bool:
    """Whether the gateway's settings have a field for `setting` (so EDGESERVE_<SETTING> is read)."""
    return setting in GatewaySettings.model_fields


def build(ctx: BuildContext) -> LaunchPlan:
    why_not = refusal(ctx)
    if why_not:
        raise PlanError(why_not)
    log = ReasonLog()
    # Settings `edgeserve serve` cannot pass are planned (and budgeted) at the engine's own defaults.
    locked = {k: v for k, v in ENGINE_DEFAULTS.items() if not gateway_reads(_PROFILE_TO_GATEWAY[k])}
    for key, value in locked.items():
        if ctx.setting(key)[0] != value and ctx.profile.source(key) in ("cli", "env"):
            raise PlanError(
                f"the embedded engine cannot take {key}={ctx.setting(key)[0]} "
                f"(edgeserve serve has no such setting); use --backend llama-server"
            )
    ctx = dataclasses.replace(ctx, profile=ctx.profile.overridden(locked))
    kv_unified = bool(ctx.setting("kv_unified")[0])
    settings = resolve_llama_settings(ctx, log, backend="embedded", kv_unified=kv_unified)
    port = pick_port(ctx, DEFAULT_PORT, "the gateway", log)
    names = {"kv_type" if k == "kv_cache_dtype" else k for k in locked}
    log.items = [r for r in log.items if r.setting not in names]
    for key in locked:
        log.add(
            key if key != "kv_cache_dtype" else "kv_type",
            locked[key],
            "derived",
            f"edgeserve serve has no {_PROFILE_TO_GATEWAY[key]} setting: the engine's default",
        )
    plan = LaunchPlan(
        backend=NAME,
        program=(*ctx.toolchain.edgeserve, "serve"),
        **plan_identity(ctx, port, HEALTH_PATH),
        **llama_plan_fields(settings),
        kv_unified=bool(kv_unified),
        threads=None if "threads" in locked else settings.threads,
        api_key=ctx.request.api_key,
        reasons=log.freeze(),
    )
    return finish(plan)


def finish(plan: LaunchPlan) -> LaunchPlan:
    """Render argv and the EDGESERVE_* variables from the plan's fields."""
    env = gpu_env(plan.gpus, plan.card)
    for field, setting in _ENV_FIELDS.items():
        value = getattr(plan, field)
        if value is None or not gateway_reads(setting):
            continue
        env[f"EDGESERVE_{setting.upper()}"] = str(value).lower() if isinstance(value, bool) else str(value)
    return plan.model_copy(update={"env": env, "argv": render(plan)})


def render(plan: LaunchPlan) -> tuple[str, ...]:
    """argv for `plan`: `edgeserve serve` flags (--ctx is the whole KV pool, as llama-server's -c)."""
    args = [
        *plan.program,
        "--backend",
        "embedded",
        "--model",
        plan.model_path,
        "--host",
        plan.host,
        "--port",
        str(plan.port),
        "--parallel",
        str(plan.n_parallel),
        "--ctx",
        str(plan.n_ctx_total),
    ]
    if plan.n_gpu_layers is not None:
        args += ["--n-gpu-layers", str(plan.n_gpu_layers)]
    if plan.api_key:
        args += ["--api-key", plan.api_key]
    return tuple(args)
