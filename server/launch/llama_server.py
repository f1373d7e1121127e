"""llama-server arg builder (llama.cpp as vendored by llama-cpp-python 0.3.36).

Flags checked against that version's common/arg.cpp and tools/server (bench/launcher_gpu_check.py checks them
against the real binary's --help on the GPU host):
- `-c` is the KV pool of ALL slots; each of the `-np` slots gets c/np, or with `-kvu` they share the pool and
  `--kv-unified-per-slot N` caps one slot at N;
- `-fa` takes a value (on|off|auto); `-ctk/-ctv` take f32, f16, bf16, q8_0, q4_0, q4_1, iq4_nl, q5_0, q5_1,
  and a quantized V cache needs flash attention;
- `-ngl` counts the output layer (n_layer + 1 = everything on the GPU);
- `--fit` is on by default and would rewrite unset sizes to what it measures at load: the plan sets them all
  and passes `--fit off`, so what runs is what was planned (and the OOM ladder, not --fit, steps down);
- several GPUs: `--split-mode layer` with an even `--tensor-split`; other machines join with `--rpc`.
"""

from __future__ import annotations

from typing import Any

from quantize.budget import Backend
from server.launch import memory
from server.launch.context import BuildContext, ReasonLog
from server.launch.plan import LaunchPlan
from server.launch.resolve import (
    PlanError,
    gpu_env,
    pick_backend_sampling,
    pick_batches,
    pick_ctx,
    pick_flash_attn,
    pick_gpu_layers,
    pick_kv_unified,
    pick_llama_kv_type,
    pick_parallel,
    pick_port,
    pick_threads,
    plan_identity,
)

NAME = "llama-server"
DEFAULT_PORT = 8080
HEALTH_PATH = "/health"

# Every flag render() can emit, as emitted (bench/launcher_gpu_check.py looks for each in --help).
EMITTED_FLAGS = (
    "-m",
    "--host",
    "--port",
    "-c",
    "-np",
    "-ngl",
    "-fa",
    "-ctk",
    "-ctv",
    "-b",
    "-ub",
    "--fit",
    "-kvu",
    "--kv-unified-per-slot",
    "--split-mode",
    "--tensor-split",
    "--metrics",
    "--api-key",
    "-t",
    "--rpc",
    "--backend-sampling",
)


def refusal(ctx: BuildContext) -> str | None:
    if not ctx.model_path.endswith(".gguf"):
        return (
            f"llama-server loads GGUF files; {ctx.model_path} is not one (quantize it first, or use sglang)"
        )
    return None


def build(ctx: BuildContext) -> LaunchPlan:
    """The llama-server plan for this card (or the CPU), model and profile."""
    why_not = refusal(ctx)
    if why_not:
        raise PlanError(why_not)
    log = ReasonLog()
    settings = resolve_llama_settings(ctx, log)
    port = pick_port(ctx, DEFAULT_PORT, "llama-server", log)
    metrics, metrics_source = ctx.setting("enable_metrics")
    log.add("enable_metrics", metrics, metrics_source, "Prometheus llamacpp:* metrics at /metrics")
    if ctx.gpus > 1:
        log.add("split_mode", "layer", "derived", f"layers split evenly over {ctx.gpus} GPUs")

    backend_sampling = pick_backend_sampling(ctx, settings.n_gpu_layers, log)
    plan = LaunchPlan(
        backend=NAME,
        program=(ctx.toolchain.llama_server or "llama-server",),
        **plan_identity(ctx, port, HEALTH_PATH),
        **llama_plan_fields(settings),
        backend_sampling=backend_sampling,
        enable_metrics=bool(metrics),
        api_key=ctx.request.api_key,
        env=gpu_env(ctx.gpus, ctx.card_id),
        reasons=log.freeze(),
    )
    return plan.model_copy(update={"argv": render(plan)})


def resolve_llama_settings(
    ctx: BuildContext, log: ReasonLog, *, backend: Backend = "llama-server"
) -> memory.LlamaFit:
    """The llama.cpp settings both llama-server and the embedded engine take, fitted to the budget."""
    n_parallel = pick_parallel(ctx, log)
    n_ctx = pick_ctx(ctx, log, engine_caps=backend == "embedded")
    kv_type = pick_llama_kv_type(ctx, log)
    flash_attn = pick_flash_attn(ctx, kv_type, log)
    n_gpu_layers = pick_gpu_layers(ctx, log)
    n_batch, n_ubatch = pick_batches(ctx, n_parallel, log)
    kv_unified = pick_kv_unified(ctx, n_parallel, n_gpu_layers, log, embedded=backend == "embedded")
    wanted = memory.LlamaFit(
        n_ctx=n_ctx,
        n_parallel=n_parallel,
        kv_type=kv_type,
        flash_attn=flash_attn,
        n_gpu_layers=n_gpu_layers,
        n_batch=n_batch,
        n_ubatch=n_ubatch,
        kv_unified=kv_unified,
    )
    fit = memory.fit_llama(ctx, wanted, log=log, backend=backend)
    n_threads = pick_threads(ctx, fit.n_gpu_layers, log, embedded=backend == "embedded")
    return fit.model_copy(update={"n_threads": n_threads})


def llama_plan_fields(settings: memory.LlamaFit) -> dict[str, Any]:
    """The LaunchPlan fields of llama.cpp settings, the same for llama-server and the embedded engine: the
    names are the same, so this is a copy, not a mapping."""
    fields = settings.model_dump(exclude={"memory"})
    return fields | {
        "memory": settings.memory,
        "expected_total_bytes": settings.memory.total_bytes if settings.memory else None,
    }


def render(plan: LaunchPlan) -> tuple[str, ...]:
    """argv for `plan`, flags as llama-server of llama-cpp-python 0.3.36's llama.cpp spells them."""
    args: list[str] = [*plan.program, "-m", plan.model_path, "--host", plan.host, "--port", str(plan.port)]
    args += ["-c", str(plan.n_ctx_total), "-np", str(plan.n_parallel)]
    if plan.n_gpu_layers is not None:
        args += ["-ngl", str(plan.n_gpu_layers)]
    args += ["-fa", plan.flash_attn, "-ctk", plan.kv_type, "-ctv", plan.kv_type]
    if plan.n_batch is not None:
        args += ["-b", str(plan.n_batch)]
    if plan.n_ubatch is not None:
        args += ["-ub", str(plan.n_ubatch)]
    args += ["--fit", "off"]
    if plan.kv_unified:
        args += ["-kvu", "--kv-unified-per-slot", str(plan.n_ctx)]
    if plan.rpc_servers:
        # local and remote devices together: llama.cpp splits the layers by each device's free memory
        args += ["--rpc", ",".join(plan.rpc_servers), "--split-mode", "layer"]
    elif plan.gpus > 1 and plan.n_gpu_layers:
        args += ["--split-mode", "layer", "--tensor-split", ",".join("1" for _ in range(plan.gpus))]
    if plan.backend_sampling:
        args.append("--backend-sampling")
    if plan.enable_metrics:
        args.append("--metrics")
    if plan.api_key:
        args += ["--api-key", plan.api_key]
    if plan.n_threads is not None:
        args += ["-t", str(plan.n_threads)]
    if plan.model_name:
        args += ["--alias", plan.model_name]
    return tuple(args)
