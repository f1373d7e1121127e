"""SGLang arg builder: `python -m sglang.launch_server ...` for a card that can run it.

Only flags SGLang 0.5.23's own parser accepts (tests parse every profile's argv with
`ServerArgs.add_cli_args`). SGLang sizes its KV pool from --mem-fraction-static ((weights + KV pool) / GPU
memory; activations and CUDA graphs live outside it); --max-total-tokens caps the pool at what the plan needs.
"""

from __future__ import annotations

from server.launch import memory
from server.launch.context import BuildContext, ReasonLog
from server.launch.plan import LaunchPlan
from server.launch.resolve import (
    PlanError,
    gpu_env,
    pick_ctx,
    pick_parallel,
    pick_port,
    pick_sglang_kv_type,
    plan_identity,
)

NAME = "sglang"
MODULE = "sglang.launch_server"
DEFAULT_PORT = 30000
HEALTH_PATH = "/health"
# Lowest --mem-fraction-static edgeserve plans with: below it the weights usually no longer fit.
MIN_MEM_FRACTION = 0.5


def refusal(ctx: BuildContext) -> str | None:
    """Why SGLang cannot serve on this target, with what to use instead; None when it can."""
    card = ctx.card
    if card is None:
        return "SGLang needs an NVIDIA GPU and there is none: use --backend embedded or llama-server"
    if not card.can_run_sglang:
        cc = ".".join(str(x) for x in card.compute_capability)
        return (
            f"SGLang cannot run on {card.id} (compute capability {cc}; its kernels need SM75 at the very "
            "least, sgl-project/sglang#1062, and edgeserve runs it on SM80+ only): "
            "use llama.cpp instead (--backend llama-server, or embedded)"
        )
    return None


def _tp_dp(ctx: BuildContext, log: ReasonLog) -> tuple[int, int]:
    gpus = max(ctx.gpus, 1)
    dp, source = ctx.setting("dp_size")
    if gpus % dp:
        if ctx.is_pinned("dp_size"):
            raise PlanError(f"dp_size {dp} does not divide {gpus} GPUs")
        log.add("dp_size", 1, "derived", f"{source} value {dp} does not divide {gpus} GPUs")
        dp = 1
    elif dp > 1:
        log.add("dp_size", dp, source, f"{dp} replicas of the model")
    tp = gpus // dp
    why = "one GPU" if tp == 1 else f"tensor parallel over {tp} GPUs of one model copy"
    heads, kv_heads = ctx.spec.n_head, max(ctx.spec.n_head_kv)
    if tp > 1 and (heads % tp or (kv_heads % tp and tp % kv_heads)):
        why += (
            f"; WARNING: {heads} attention / {kv_heads} KV heads do not split over {tp}, SGLang will refuse"
        )
    log.add("tp_size", tp, "derived", why)
    return tp, dp


def build(ctx: BuildContext) -> LaunchPlan:
    """The SGLang plan for this card, model and profile. Raises PlanError if SGLang cannot run on the card."""
    why_not = refusal(ctx)
    if why_not:
        raise PlanError(why_not)
    log = ReasonLog()
    n_parallel = pick_parallel(ctx, log)
    n_ctx = pick_ctx(ctx, log)
    kv_type = pick_sglang_kv_type(ctx, log)
    tp, dp = _tp_dp(ctx, log)
    port = pick_port(ctx, DEFAULT_PORT, "SGLang", log)

    chunked, chunked_source = ctx.setting("enable_chunked_prefill")
    size, size_source = ctx.setting("n_batch")
    chunk = int(size) if chunked else -1
    log.add(
        "chunked_prefill_size",
        chunk,
        size_source if chunked else chunked_source,
        "prompt chunk per prefill step" if chunked else "chunked prefill off (-1)",
    )
    policy, policy_source = ctx.setting("schedule_policy")
    log.add("schedule_policy", policy, policy_source, "order in which waiting requests are scheduled")
    eager, eager_source = ctx.setting("enforce_eager")
    if eager:
        log.add("enforce_eager", True, eager_source, "no CUDA graphs (less memory, slower decode)")
    prefix, prefix_source = ctx.setting("prefix_cache")
    if not prefix:
        log.add("prefix_cache", False, prefix_source, "radix (prefix) cache off")
    metrics, metrics_source = ctx.setting("enable_metrics")
    log.add("enable_metrics", metrics, metrics_source, "Prometheus sglang:* metrics at /metrics")

    fit = memory.fit_sglang(ctx, n_ctx=n_ctx, n_parallel=n_parallel, kv_type=kv_type, tp_size=tp, log=log)
    plan = LaunchPlan(
        backend=NAME,
        program=(ctx.toolchain.sglang_python or ctx.toolchain.python, "-m", MODULE),
        **plan_identity(ctx, port, HEALTH_PATH),
        n_ctx=fit.n_ctx,
        n_parallel=fit.n_parallel,
        mem_fraction=fit.mem_fraction,
        kv_type=kv_type,
        chunked_prefill_size=chunk,
        tp_size=tp,
        dp_size=dp,
        schedule_policy=str(policy),
        enable_metrics=bool(metrics),
        enforce_eager=bool(eager),
        prefix_cache=bool(prefix),
        api_key=ctx.request.api_key,
        env=gpu_env(ctx.gpus, ctx.card_id),
        memory=fit.memory,
        expected_total_bytes=fit.memory.total_bytes if fit.memory else None,
        reasons=log.freeze(),
    )
    return plan.model_copy(update={"argv": render(plan)})


def render(plan: LaunchPlan) -> tuple[str, ...]:
    """argv for `plan`: only SGLang 0.5.23 flags, every value spelled as its parser expects."""
    args: list[str] = [*plan.program, "--model-path", plan.model_path]
    if plan.model_path.endswith(".gguf"):
        args += ["--load-format", "gguf"]
    args += ["--host", plan.host, "--port", str(plan.port)]
    if plan.mem_fraction is not None:
        args += ["--mem-fraction-static", f"{plan.mem_fraction:.3f}"]
    args += [
        "--max-running-requests",
        str(plan.n_parallel),
        "--context-length",
        str(plan.n_ctx),
        "--max-total-tokens",
        str(plan.n_ctx_total),
        "--kv-cache-dtype",
        plan.kv_type,
        "--tp-size",
        str(plan.tp_size),
    ]
    if plan.dp_size > 1:
        args += ["--dp-size", str(plan.dp_size)]
    if plan.chunked_prefill_size is not None:
        args += ["--chunked-prefill-size", str(plan.chunked_prefill_size)]
    if plan.schedule_policy:
        args += ["--schedule-policy", plan.schedule_policy]
    if plan.enforce_eager:
        args.append("--disable-cuda-graph")
    if not plan.prefix_cache:
        args.append("--disable-radix-cache")
    if plan.enable_metrics:
        args.append("--enable-metrics")
    if plan.api_key:
        args += ["--api-key", plan.api_key]
    if plan.model_name:
        args += ["--served-model-name", plan.model_name]
    if plan.nnodes > 1:
        args += ["--nnodes", str(plan.nnodes), "--node-rank", str(plan.node_rank)]
        if plan.dist_init_addr:
            args += ["--dist-init-addr", plan.dist_init_addr]
    return tuple(args)
