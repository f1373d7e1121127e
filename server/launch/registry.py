"""The backend registry: name -> arg builder. Its keys are the choices of `edgeserve launch --backend`.

Each backend is a pure builder (BuildContext -> LaunchPlan), a `finish` that renders argv/env from a plan's
fields (the OOM ladder calls it after changing a setting), the ladder rungs it can take, and a refusal check.
`choose_backend` is the `auto` rule: SGLang where the card can run it and it is installed; llama.cpp elsewhere
(llama-server when the binary is on PATH, else the embedded engine); the embedded engine on the CPU.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from server.hardware.target import cpu_target
from server.launch import embedded, llama_server, sglang
from server.launch.backend_speed import engine_verdict
from server.launch.context import BuildContext
from server.launch.plan import LaunchPlan, Reason
from server.launch.profile import FORGET_TUNED
from server.launch.resolve import PlanError, gpu_env

_DEVICE_VARS = ("CUDA_DEVICE_ORDER", "CUDA_VISIBLE_DEVICES")
# Ladder rungs (server.launch.ladder.RUNGS) each backend can take.
_LLAMA_RUNGS = frozenset({"context", "parallel", "kv_type", "quant", "gpu_layers", "cpu"})


class UnknownBackendError(ValueError):
    """No backend has that name; the message lists the supported ones."""


class BackendRefusedError(PlanError):
    """The backend cannot run on this card or machine; the message says why and what to use instead."""


@dataclass(frozen=True)
class BackendSpec:
    name: str
    description: str
    build: Callable[[BuildContext], LaunchPlan]
    finish: Callable[[LaunchPlan], LaunchPlan]
    refusal: Callable[[BuildContext], str | None]
    rungs: frozenset[str]
    health_path: str


def _with_argv(render: Callable[[LaunchPlan], tuple[str, ...]]) -> Callable[[LaunchPlan], LaunchPlan]:
    def finish(plan: LaunchPlan) -> LaunchPlan:
        env = {k: v for k, v in plan.env.items() if k not in _DEVICE_VARS} | gpu_env(plan.gpus, plan.card)
        return plan.model_copy(update={"argv": render(plan), "env": env})

    return finish


BACKENDS: dict[str, BackendSpec] = {
    sglang.NAME: BackendSpec(
        name=sglang.NAME,
        description="SGLang (python -m sglang.launch_server); GPUs with compute capability 8.0+",
        build=sglang.build,
        finish=_with_argv(sglang.render),
        refusal=sglang.refusal,
        rungs=frozenset({"context", "parallel", "mem_fraction", "kv_type"}),
        health_path=sglang.HEALTH_PATH,
    ),
    llama_server.NAME: BackendSpec(
        name=llama_server.NAME,
        description="llama.cpp's llama-server; any GPU from Pascal on, or the CPU",
        build=llama_server.build,
        finish=_with_argv(llama_server.render),
        refusal=llama_server.refusal,
        rungs=_LLAMA_RUNGS,
        health_path=llama_server.HEALTH_PATH,
    ),
    embedded.NAME: BackendSpec(
        name=embedded.NAME,
        description="edgeserve's gateway with its in-process llama.cpp engine (edgeserve serve)",
        build=embedded.build,
        finish=embedded.finish,
        refusal=embedded.refusal,
        rungs=_LLAMA_RUNGS,
        health_path=embedded.HEALTH_PATH,
    ),
}

AUTO = "auto"


def backend_names() -> tuple[str, ...]:
    return tuple(BACKENDS)


def backend_choices() -> tuple[str, ...]:
    """What `--backend` accepts: auto and every registered backend."""
    return (AUTO, *BACKENDS)


def get_backend(name: str) -> BackendSpec:
    try:
        return BACKENDS[name]
    except KeyError:
        raise UnknownBackendError(
            f"unknown backend {name!r}; supported: {', '.join(backend_choices())}"
        ) from None


def choose_backend(ctx: BuildContext) -> tuple[BackendSpec, Reason]:
    """The backend asked for (or the `auto` rule's), refused with a reason where it cannot run."""
    requested = ctx.request.backend
    if requested != AUTO:
        spec = get_backend(requested)
        why_not = spec.refusal(ctx)
        if why_not:
            raise BackendRefusedError(why_not)
        return spec, Reason(setting="backend", value=spec.name, source="cli", why="--backend")
    preferred, source = ctx.setting("preferred_backend")
    if preferred != AUTO:
        spec = get_backend(preferred)
        if spec.refusal(ctx) is None and _is_installed(spec.name, ctx):
            return spec, Reason(
                setting="backend",
                value=spec.name,
                source=source,
                why=f"preferred backend of the {ctx.card_id} profile",
            )
    name, why = auto_backend(ctx)
    return get_backend(name), Reason(setting="backend", value=name, source="derived", why=why)


def _is_installed(name: str, ctx: BuildContext) -> bool:
    if name == sglang.NAME:
        return ctx.toolchain.has_sglang
    if name == llama_server.NAME:
        return ctx.toolchain.has_llama_server
    return True


def auto_backend(ctx: BuildContext) -> tuple[str, str]:
    """The `auto` rule, with the reason in words."""
    card = ctx.card
    if card is None:
        return embedded.NAME, "no GPU: the embedded engine batches on the CPU"
    if not ctx.model_path.endswith(".gguf"):
        return sglang.NAME, "the model is not a GGUF: only SGLang loads it"
    why_not = sglang.refusal(ctx)
    if why_not is None and ctx.toolchain.has_sglang:
        return sglang.NAME, f"{card.id} runs SGLang and it is installed"
    if why_not:
        cc = ".".join(str(x) for x in card.compute_capability)
        head = f"{card.id} (compute capability {cc}) cannot run SGLang"
    else:
        head = "SGLang is not installed"
    name, why = _llama_cpp_backend(ctx)
    return name, f"{head}; {why}"


def _llama_cpp_backend(ctx: BuildContext) -> tuple[str, str]:
    """llama.cpp on a GPU: the embedded engine or llama-server, whichever was measured faster for the planned
    number of streams and can use the GPU here."""
    if not ctx.toolchain.engine_gpu_offload:
        if ctx.toolchain.has_llama_server:
            return llama_server.NAME, ("llama-server is on PATH (the embedded engine's llama.cpp has no GPU "
                                       "support)")
        return embedded.NAME, ("llama-server is not on PATH and the embedded engine's llama.cpp has no GPU "
                               "support: it runs on the CPU (rebuild it with CUDA: "
                               "phase1_foundation/setup_env.sh)")
    if not ctx.toolchain.has_llama_server:
        return embedded.NAME, "the embedded engine (llama-server is not on PATH)"
    streams = int(ctx.setting("n_parallel")[0])
    verdict = engine_verdict(streams)
    if verdict is None or verdict.engine_wins:
        why = verdict.why(streams) if verdict else "nothing measured: the embedded engine"
        return embedded.NAME, why
    return llama_server.NAME, verdict.why(streams)


def build_plan(ctx: BuildContext) -> LaunchPlan:
    """Choose the backend and build its plan; the backend choice is the plan's first reason, and a value from
    the tuned profile says which tune it came from."""
    spec, reason = choose_backend(ctx)
    on_this_machine = ctx.request.card == "auto"  # a named card may be another machine's, with its own build
    if spec.name == embedded.NAME and ctx.gpus and on_this_machine and not ctx.toolchain.engine_gpu_offload:
        # Never silent: a GPU plan for an engine whose llama.cpp cannot use the GPU would be budgeted for
        # the card and run on the CPU. It is planned for the CPU, and the plan says why and what to do.
        ctx = dataclasses.replace(ctx, target=cpu_target())  # this host's RAM (a read, like detection)
        why = (f"{reason.why}; ON THE CPU: the embedded engine's llama.cpp has no GPU support (rebuild it "
               "with CUDA: phase1_foundation/setup_env.sh on a host with the CUDA toolkit)")
        reason = reason.model_copy(update={"why": why})
    plan = spec.build(ctx)
    note = ctx.profile.tuned_by
    reasons = (reason, *(r for r in plan.reasons if r.setting != "backend"))
    if note:
        # Where the file is and how to drop it: a tuned value outlives the tune that wrote it.
        undo = f"{ctx.profile.tuned_path}; undo: {FORGET_TUNED} --card {ctx.card_id}"
        reasons = tuple(
            r.model_copy(update={"why": f"{r.why}; {note} ({undo})"}) if r.source == "tuned" else r
            for r in reasons
        )
    return plan.model_copy(update={"reasons": reasons})
