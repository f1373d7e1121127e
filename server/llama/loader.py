"""Loading a model into llama.cpp, for the engine and the quantizer alike.

One backend initialisation per process, the CPU extra-buffer (AMX) guard, the model and context parameters
under llama.cpp's own names, and errors that quote llama.cpp's reason when its log is being captured
(server/llama/log.py). llama.cpp's cparams.n_ctx is the cells of ALL sequences: ContextParams calls it
n_ctx_total, as edgeserve does everywhere (its n_ctx is one sequence's).
"""

from __future__ import annotations

import ctypes
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import llama_cpp.llama_cpp as lc

from quantize.model.kv_types import kv_ggml_type
from server.llama.log import LogCapture
from server.llama.offload import is_full_offload

# llama.cpp offloads min(n_gpu_layers, n_layer + 1) layers: a large number means all of them.
ALL_LAYERS = 999

FlashAttn = Literal["on", "off", "auto"]
_FLASH_ATTN = {
    "on": lc.LLAMA_FLASH_ATTN_TYPE_ENABLED,
    "off": lc.LLAMA_FLASH_ATTN_TYPE_DISABLED,
    "auto": lc.LLAMA_FLASH_ATTN_TYPE_AUTO,
}

_POOLING = {
    "none": lc.LLAMA_POOLING_TYPE_NONE,
    "mean": lc.LLAMA_POOLING_TYPE_MEAN,
    "cls": lc.LLAMA_POOLING_TYPE_CLS,
    "last": lc.LLAMA_POOLING_TYPE_LAST,
}

_backend_lock = threading.Lock()
_backend_ready = False


class LlamaLoadError(RuntimeError):
    """llama.cpp could not load the model or create a context; the message has its reason where known."""


def init_backend(verbose: bool = False) -> None:
    """llama_backend_init, once per process; llama.cpp's log is quiet unless `verbose`."""
    global _backend_ready
    with _backend_lock:
        if not _backend_ready:
            # llama-cpp-python routes llama.cpp's log through this logger; by default it prints everything.
            from llama_cpp import _logger

            _logger.set_verbose(verbose)
            lc.llama_backend_init()
            _backend_ready = True


def build_has_amx() -> bool:
    """Whether the loaded llama.cpp CPU backend was compiled with AMX kernels (True when it cannot tell)."""
    try:
        lib = ctypes.CDLL(str(Path(lc._base_path) / "libggml-cpu.so"))
        probe = lib.ggml_cpu_has_amx_int8
    except (OSError, AttributeError):
        return True
    probe.restype = ctypes.c_int
    return bool(probe())


def cpu_reports_amx() -> bool:
    """True when /proc/cpuinfo lists AMX tiles (which llama.cpp's CPU extra buffers would use)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return "amx_tile" in line.split()
    except OSError:
        pass
    return False


def default_extra_bufts() -> bool:
    """Whether llama.cpp's CPU extra buffer types (weight repacking, AMX) may be used.

    Off only where the CPU lists AMX and the loaded build has AMX kernels: some virtual machines list AMX
    tiles they cannot run, and the first batched decode then dies of SIGILL (llama.cpp PR 26954).
    edgeserve's own build leaves AMX out.
    """
    return not (cpu_reports_amx() and build_has_amx())


def _reason(log: LogCapture | None) -> str:
    found = log.last_error() if log is not None else None
    return f": {found}" if found else ""


def load_model(
    path: str | Path, *, n_gpu_layers: int, use_extra_bufts: bool | None = None, log: LogCapture | None = None
) -> int:
    """llama_model_load_from_file; n_gpu_layers < 0 = all layers; use_extra_bufts None = the AMX guard."""
    path = Path(path)
    if not path.is_file():
        raise LlamaLoadError(f"model file not found: {path}")
    mparams = lc.llama_model_default_params()
    mparams.n_gpu_layers = ALL_LAYERS if n_gpu_layers < 0 else n_gpu_layers
    mparams.use_extra_bufts = default_extra_bufts() if use_extra_bufts is None else use_extra_bufts
    model = lc.llama_model_load_from_file(str(path).encode(), mparams)
    if not model:
        raise LlamaLoadError(f"llama.cpp could not load {path}{_reason(log)}")
    return int(model)


def load_vocab(path: str | Path, *, log: LogCapture | None = None) -> int:
    """A model with its vocabulary and metadata only (no weights, no device): what a process that tokenizes
    and detokenizes needs. An empty device list keeps llama.cpp from touching (holding memory on) a GPU."""
    path = Path(path)
    if not path.is_file():
        raise LlamaLoadError(f"model file not found: {path}")
    mparams = lc.llama_model_default_params()
    mparams.vocab_only = True
    no_devices = (ctypes.c_void_p * 1)(None)
    mparams.devices = ctypes.addressof(no_devices)
    model = lc.llama_model_load_from_file(str(path).encode(), mparams)
    if not model:
        raise LlamaLoadError(f"llama.cpp could not read the vocabulary of {path}{_reason(log)}")
    return int(model)


def devices() -> tuple[str, ...]:
    """The devices this llama.cpp build can compute on, as "<name> (<description>)" (ggml's registry)."""
    lib = ctypes.CDLL(str(Path(lc._base_path) / "libggml.so"))
    base = ctypes.CDLL(str(Path(lc._base_path) / "libggml-base.so"))
    lib.ggml_backend_dev_count.restype = ctypes.c_size_t
    lib.ggml_backend_dev_get.restype = ctypes.c_void_p
    lib.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
    for fn in (base.ggml_backend_dev_name, base.ggml_backend_dev_description):
        fn.restype = ctypes.c_char_p
        fn.argtypes = [ctypes.c_void_p]
    out = []
    for i in range(lib.ggml_backend_dev_count()):
        dev = lib.ggml_backend_dev_get(i)
        name = (base.ggml_backend_dev_name(dev) or b"?").decode(errors="replace")
        desc = (base.ggml_backend_dev_description(dev) or b"").decode(errors="replace")
        out.append(f"{name} ({desc})" if desc and desc != name else name)
    return tuple(out)


def output_on_gpu(model: int, n_gpu_layers: int) -> bool:
    """Whether the output layer of a model loaded with `n_gpu_layers` sits on a GPU (-ngl counts it as layer
    n_layer + 1, so only a full offload puts it there)."""
    if not lc.llama_supports_gpu_offload():
        return False
    return is_full_offload(n_gpu_layers, lc.llama_model_n_layer(model))


@dataclass(frozen=True)
class ContextParams:
    """llama_context_params under llama.cpp's names, but for n_ctx_total: the cells of all `n_seq_max`
    sequences (cparams.n_ctx)."""

    n_ctx_total: int
    n_batch: int
    n_ubatch: int
    n_threads: int
    n_threads_batch: int
    n_seq_max: int = 1
    kv_unified: bool = False
    kv_type: str = "f16"
    flash_attn: FlashAttn = "auto"
    n_outputs_max_per_seq: int = 0  # 0: llama.cpp's default (n_batch)
    embeddings: bool = False  # a context that outputs pooled embeddings instead of logits
    pooling: str = "mean"  # with embeddings: none, mean, cls, last

    def describe(self) -> str:
        return (
            f"n_ctx_total={self.n_ctx_total}, n_seq_max={self.n_seq_max}, kv_type={self.kv_type}, "
            f"flash_attn={self.flash_attn}"
        )


def new_context(model: int, params: ContextParams, *, path: str | Path, log: LogCapture | None = None) -> int:
    """llama_init_from_model with `params`; frees nothing on failure (the caller owns the model)."""
    cparams = lc.llama_context_default_params()
    cparams.n_ctx = params.n_ctx_total
    cparams.n_batch = params.n_batch
    cparams.n_ubatch = params.n_ubatch
    cparams.n_seq_max = params.n_seq_max
    cparams.n_threads = params.n_threads
    cparams.n_threads_batch = params.n_threads_batch
    cparams.kv_unified = params.kv_unified
    cparams.type_k = cparams.type_v = kv_ggml_type(params.kv_type)
    cparams.flash_attn_type = _FLASH_ATTN[params.flash_attn]
    cparams.n_outputs_max_per_seq = params.n_outputs_max_per_seq
    if params.embeddings:
        cparams.embeddings = True
        cparams.pooling_type = _POOLING[params.pooling]
    cparams.no_perf = True
    ctx = lc.llama_init_from_model(model, cparams)
    if not ctx:
        # "llama.cpp could not create a context" is what server/hardware/oom.py recognises as out of memory.
        raise LlamaLoadError(
            f"llama.cpp could not create a context for {path} ({params.describe()}){_reason(log)}"
        )
    return int(ctx)


def free(model: int | None, ctx: int | None = None) -> None:
    """llama_free and llama_model_free for what is not None."""
    if ctx:
        lc.llama_free(ctx)
    if model:
        lc.llama_model_free(model)
