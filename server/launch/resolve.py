"""Setting choices shared by the arg builders: each returns a value and records where it came from and why."""

from __future__ import annotations

from typing import Any

from quantize.model.kv_types import (
    LLAMA_KV_TYPES,
    SGLANG_KV_TYPES,
    flash_attn_needed,
    is_quantized_kv,
    needs_flash_attn,
)
from server.engine.config import cap_n_ctx, default_kv_unified
from server.hardware.target import CPU_ID
from server.launch.backend_speed import backend_sampling_wins
from server.launch.context import BuildContext, ReasonLog
from server.launch.plan import Source
from server.llama.offload import offload_layers

SGLANG_FP8_KV = ("fp8_e4m3", "fp8_e5m2")
# The smallest context halve_ctx steps down to (llama.cpp pads contexts to 256 cells).
MIN_HALVED_CTX = 256


class PlanError(ValueError):
    """The flags asked for something this backend or card cannot do; the message says what to do instead."""


def given_by(ctx: BuildContext, setting: str, source: Source, default_why: str) -> str:
    """Where a value the user (or the profile) chose came from, in words for the plan's reasons: the flag,
    variable and key all carry the setting's own name."""
    return {
        "cli": "--" + setting.replace("_", "-"),
        "env": f"EDGESERVE_{setting.upper()}",
        "profile": f"{setting} in the {ctx.card_id} profile",
        "tuned": f"{setting} in the {ctx.card_id} tuned profile",
    }.get(source, default_why)


def pick_parallel(ctx: BuildContext, log: ReasonLog) -> int:
    value, source = ctx.setting("n_parallel")
    why = given_by(ctx, "n_parallel", source, "default number of sequences decoded at once")
    log.add("n_parallel", value, source, why)
    return int(value)


def pick_ctx(ctx: BuildContext, log: ReasonLog, *, engine_caps: bool = False) -> int:
    """Context of one sequence. A profile/default value above the model's training context is capped to it
    (cap_n_ctx, the engine's own rule); a pinned one is kept, with a warning in its reason, except where the
    backend caps it anyway (`engine_caps`: the embedded engine), so the plan is budgeted for what will run."""
    value, source = ctx.setting("n_ctx")
    n_train = ctx.spec.n_ctx_train
    capped = cap_n_ctx(value, n_train)
    if capped != value:
        if engine_caps:
            log.add("n_ctx", capped, "derived",
                    f"{source} value {value}: the embedded engine runs no sequence past the model's training "
                    f"context {n_train}")
            return int(capped)
        if ctx.is_pinned("n_ctx"):
            log.add("n_ctx", value, source, f"asked for; above the model's training context {n_train}")
            return int(value)
        log.add("n_ctx", capped, "derived", f"{source} value {value} capped at the model's training context")
        return int(capped)
    log.add("n_ctx", value, source, given_by(ctx, "n_ctx", source, "default context per sequence"))
    return int(value)


def pick_llama_kv_type(ctx: BuildContext, log: ReasonLog) -> str:
    """llama.cpp cache type for K and V (the same for both)."""
    value, source = ctx.setting("kv_type")
    name = str(value).lower()
    if name == "auto":
        log.add(
            "kv_type", "f16", "derived" if source != "default" else "default", "auto: llama.cpp's f16 cache"
        )
        return "f16"
    if name in SGLANG_FP8_KV:
        if source == "cli":
            raise PlanError(f"llama.cpp has no {name} KV cache; use one of {', '.join(LLAMA_KV_TYPES)}")
        log.add("kv_type", "q8_0", "derived", f"{source} asks {name}: llama.cpp's 8-bit cache is q8_0")
        return "q8_0"
    if name not in LLAMA_KV_TYPES:
        raise PlanError(f"unknown llama.cpp KV cache type {value!r}; use one of {', '.join(LLAMA_KV_TYPES)}")
    log.add("kv_type", name, source, "KV cache type for K and V")
    return name


def pick_sglang_kv_type(ctx: BuildContext, log: ReasonLog) -> str:
    """SGLang --kv-cache-dtype; fp8 only where the card has FP8 (SM89+)."""
    value, source = ctx.setting("kv_type")
    name = str(value).lower()
    card = ctx.card
    can_fp8 = card is not None and card.can_fp8_kv
    if name in ("f16", "fp16", "float16"):
        log.add("kv_type", "auto", "derived", f"{source} asks {name}: SGLang's auto keeps the model's dtype")
        return "auto"
    if is_quantized_kv(name):
        if source == "cli":
            raise PlanError(f"SGLang has no {name} KV cache; use one of {', '.join(SGLANG_KV_TYPES)}")
        new = "fp8_e4m3" if can_fp8 else "auto"
        why = (
            "SGLang's 8-bit cache is fp8" if can_fp8 else "no FP8 on this card; SGLang keeps the model dtype"
        )
        log.add("kv_type", new, "derived", f"{source} asks {name}: {why}")
        return new
    if name not in SGLANG_KV_TYPES:
        raise PlanError(f"unknown SGLang KV cache type {value!r}; use one of {', '.join(SGLANG_KV_TYPES)}")
    if name in SGLANG_FP8_KV and not can_fp8:
        if source == "cli":
            raise PlanError(f"{name} KV cache needs FP8 hardware (SM89+); {ctx.card_id} has none")
        log.add("kv_type", "auto", "derived", f"{source} asks {name} but {ctx.card_id} has no FP8")
        return "auto"
    log.add("kv_type", name, source, "SGLang KV cache dtype")
    return name


def pick_flash_attn(ctx: BuildContext, kv_type: str, log: ReasonLog) -> str:
    """llama.cpp flash attention: its kernels run from Pascal on and on the CPU; a quantized V needs it."""
    value, source = ctx.setting("flash_attn")
    card = ctx.card
    if value == "on" and card is not None and not card.has_flash_attn_kernels:
        if source == "cli":
            raise PlanError(f"llama.cpp's flash attention kernels need Pascal or newer; {card.id} is older")
        log.add("flash_attn", "off", "derived", f"{card.id} predates llama.cpp's flash attention kernels")
        return "off"
    if value != "on" and needs_flash_attn(kv_type):
        if ctx.is_pinned("flash_attn"):
            raise PlanError(f"{flash_attn_needed(kv_type)} on; drop flash_attn={value} or use f16")
        log.add("flash_attn", "on", "derived", flash_attn_needed(kv_type))
        return "on"
    log.add("flash_attn", value, source, "flash attention (llama.cpp's own kernels)")
    return str(value)


def pick_gpu_layers(ctx: BuildContext, log: ReasonLog) -> int:
    """Layers on the GPU, counting the output layer as llama.cpp does (n_layer + 1 = all); 0 on the CPU."""
    n_all = offload_layers(ctx.spec.n_layer)
    if ctx.gpus == 0:
        log.add("n_gpu_layers", 0, "derived", "no GPU: every layer on the CPU")
        return 0
    value, source = ctx.setting("n_gpu_layers")
    if value < 0:
        log.add(
            "n_gpu_layers",
            n_all,
            source if source != "default" else "default",
            f"-1 = all {ctx.spec.n_layer} layers and the output layer on the GPU",
        )
        return n_all
    if value > n_all:
        log.add("n_gpu_layers", n_all, "derived", f"{source} value {value} is more than the model has")
        return n_all
    log.add("n_gpu_layers", value, source, "layers on the GPU")
    return int(value)


def pick_threads(ctx: BuildContext, n_gpu_layers: int, log: ReasonLog, *,
                 embedded: bool = False) -> int | None:
    """CPU threads, set only when some layers run on the CPU. Left to the embedded engine, whose threads
    follow the cores other processes leave free; llama-server gets one per usable CPU, as its own default."""
    if ctx.all_on_gpu(n_gpu_layers):
        return None
    value, source = ctx.setting("n_threads")
    if value is None and embedded:
        log.add("n_threads", "free cores", "derived",
                "layers on the CPU: the engine computes with as many threads as the cores other processes "
                "leave free, re-read every half second (beside a busy neighbour a thread per usable CPU made "
                "a step 3-10x slower, docs/BENCHMARKS.md)")
        return None
    if value is None:
        n = ctx.toolchain.cpu_threads
        log.add("n_threads", n, "derived",
                "layers on the CPU: one thread per usable CPU, llama-server's own default (its threads spin "
                "at barriers: fastest on an idle machine, several times slower beside a busy neighbour; "
                "the embedded engine adapts, docs/BENCHMARKS.md)")
        return n
    log.add("n_threads", value, source, "CPU threads for layers on the CPU")
    return int(value)


def pick_port(ctx: BuildContext, default: int, what: str, log: ReasonLog) -> int:
    if ctx.request.port is not None:
        log.add("port", ctx.request.port, "cli", "--port")
        return ctx.request.port
    log.add("port", default, "default", f"{what}'s usual port")
    return default


def pick_batches(ctx: BuildContext, n_parallel: int, log: ReasonLog) -> tuple[int, int]:
    """llama.cpp logical (-b) and physical (-ub) batch; -ub never exceeds -b, and -b holds one token of every
    sequence (the engine decodes them all in each step)."""
    b, b_source = ctx.setting("n_batch")
    ub, ub_source = ctx.setting("n_ubatch")
    if b < n_parallel:
        log.add("n_batch", n_parallel, "derived", f"{b_source} value {b} is below n_parallel {n_parallel}")
        b = n_parallel
    else:
        log.add("n_batch", b, b_source, "tokens per llama_decode call (prompt chunk)")
    if ub > b:
        log.add("n_ubatch", b, "derived", f"{ub_source} value {ub} above the batch size")
        return int(b), int(b)
    log.add("n_ubatch", ub, ub_source, "physical batch: sizes the compute buffer")
    return int(b), int(ub)


# llama-server keeps a cache per sequence on the GPU up to this many slots: the engine's one-pool rule was
# measured for the engine; llama-server's layout was measured only beyond it (docs/BENCHMARKS.md, issue 9).
LLAMA_SERVER_POOL_ABOVE = 32


_POOL_WHY_CPU = ("the output layer on the CPU: one pool lets every new prompt prefill in the same step (8 "
                 "concurrent requests 1.64-1.73x the rate of sequential ones against 1.09-1.44x with a cache "
                 "per sequence, docs/BENCHMARKS.md); each slot capped at n_ctx")
_POOL_WHY_GPU = ("on a GPU, one pool at any slot count: with a cache per sequence llama.cpp cuts every step "
                 "that mixes decoding and prefilling into pieces (on mixed prompts 32 such slots made "
                 "0.41x of 64 pooled slots at 32 streams on an H100, docs/BENCHMARKS.md); each slot capped "
                 "at n_ctx")


def pick_kv_unified(ctx: BuildContext, n_parallel: int, n_gpu_layers: int, log: ReasonLog, *,
                    embedded: bool = False) -> bool:
    """llama.cpp's unified KV cache (one pool of n_ctx * n_parallel cells, each sequence still at most
    n_ctx); only meaningful with several sequences. Unset: the engine's rule (default_kv_unified) for the
    embedded engine; llama-server keeps its own layout on the CPU and up to LLAMA_SERVER_POOL_ABOVE slots on
    a GPU (where the engine's rule was measured for the engine only)."""
    value, source = ctx.setting("kv_unified")
    if n_parallel < 2:
        return False
    if value is None:
        on_gpu = ctx.all_on_gpu(n_gpu_layers)
        if embedded:
            if not default_kv_unified(n_parallel, on_gpu):
                return False
            log.add("kv_unified", True, "derived", _POOL_WHY_GPU if on_gpu else _POOL_WHY_CPU)
            return True
        if not on_gpu or n_parallel <= LLAMA_SERVER_POOL_ABOVE:
            return False
        log.add("kv_unified", True, "derived",
                f"over {LLAMA_SERVER_POOL_ABOVE} slots on the GPU: with one pool llama.cpp runs a step that "
                "mixes decoding and prefilling sequences whole, not cut per sequence (a cache per sequence "
                "fell to 0.4x of llama-server at 64 mixed streams on an H200, docs/BENCHMARKS.md); each slot "
                "capped at n_ctx")
        return True
    if value:
        log.add("kv_unified", True, source, "one KV pool for all slots; each slot capped at n_ctx")
        return True
    return False


def pick_backend_sampling(ctx: BuildContext, n_gpu_layers: int, log: ReasonLog) -> bool | None:
    """llama-server's --backend-sampling: the profile's value, else on where the output layer is on a GPU and
    it measured faster than llama-server's own host sampling (backend_speed.yaml)."""
    value, source = ctx.setting("backend_sampling")
    if value is not None:
        log.add("backend_sampling", bool(value), source, "sampling inside llama.cpp's decode graph")
        return bool(value)
    on_gpu = ctx.all_on_gpu(n_gpu_layers)
    measured = backend_sampling_wins()
    if not on_gpu or measured is None:
        return None
    wins, cells, record = measured
    if wins * 2 <= cells:
        return None
    log.add("backend_sampling", True, "derived",
            f"faster than llama-server's host sampling in {wins} of {cells} request shapes x stream counts "
            f"({record.where()}; docs/BENCHMARKS.md)")
    return True


def halve_ctx(n_ctx: int) -> int:
    """Half of a context, rounded down to a multiple of 256 (llama.cpp pads to 256), never below
    MIN_HALVED_CTX."""
    return max(MIN_HALVED_CTX, (n_ctx // 2) // 256 * 256)


def health_url(host: str, port: int, path: str) -> str:
    """The URL a client on this machine polls for a server bound to `host` (0.0.0.0 is reached on
    loopback)."""
    reach = "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
    if ":" in reach:
        reach = f"[{reach}]"
    return f"http://{reach}:{port}{path}"


def gpu_env(gpus: int, card: str) -> dict[str, str]:
    """Pin a plan to the first `gpus` devices in PCI order (nvidia-smi's order); hide them for a CPU plan on a
    GPU machine (the ladder's last rung), so llama.cpp allocates nothing on the device."""
    if gpus > 0:
        return {
            "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
            "CUDA_VISIBLE_DEVICES": ",".join(str(i) for i in range(gpus)),
        }
    if card != CPU_ID:
        return {"CUDA_VISIBLE_DEVICES": ""}
    return {}


def plan_identity(ctx: BuildContext, port: int, health_path: str) -> dict[str, Any]:
    """The LaunchPlan fields every backend fills the same way: card, model and where it listens."""
    return {
        "card": ctx.card_id,
        "gpus": ctx.gpus,
        "model_path": ctx.model_path,
        "model_bytes": ctx.model_bytes,
        "quant": ctx.spec.file_type_name,
        "quant_alternatives": ctx.alternatives,
        "n_layer": ctx.spec.n_layer,
        "host": ctx.request.host,
        "port": port,
        "health_url": health_url(ctx.request.host, port, health_path),
        "force": ctx.request.force,
        "shutdown_grace_s": float(ctx.setting("shutdown_grace_s")[0]),
        "model_name": ctx.request.model_name,
    }
