"""One llama.cpp model and context, through llama-cpp-python's low-level bindings.

Everything that touches llama.cpp pointers lives here (and in batch.py / sampling.py). Tokenization and
vocabulary look-ups are thread-safe in llama.cpp; decode and memory operations are called from the engine's
decode thread only.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from pathlib import Path

import llama_cpp.llama_cpp as lc
import numpy as np

from server.engine.config import EngineConfig
from server.engine.errors import ModelLoadError

log = logging.getLogger(__name__)

_backend_lock = threading.Lock()
_backend_ready = False


def _init_backend(verbose: bool) -> None:
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
    tiles they cannot run, and the first batched decode then dies of SIGILL. edgeserve's own build leaves
    AMX out.
    """
    return not (cpu_reports_amx() and build_has_amx())


class LlamaRuntime:
    """A loaded model with one context of `n_parallel` sequences."""

    def __init__(self, config: EngineConfig) -> None:
        path = Path(config.model_path)
        if not path.is_file():
            raise ModelLoadError(f"model file not found: {path}")
        _init_backend(config.verbose)

        mparams = lc.llama_model_default_params()
        mparams.n_gpu_layers = config.n_gpu_layers
        extra = config.cpu_extra_bufts
        if extra is None:
            extra = default_extra_bufts()
        mparams.use_extra_bufts = extra
        model = lc.llama_model_load_from_file(str(path).encode(), mparams)
        if not model:
            raise ModelLoadError(f"llama.cpp could not load {path}")
        self.model: int = model

        cparams = lc.llama_context_default_params()
        cparams.n_ctx = config.n_ctx
        cparams.n_batch = config.n_batch
        cparams.n_ubatch = config.n_ubatch
        cparams.n_seq_max = config.n_parallel
        cparams.n_threads = config.threads
        cparams.n_threads_batch = config.threads_batch
        # The output layer is on a GPU when every layer is offloaded (-ngl counts it as layer n_layer + 1).
        self.output_on_gpu: bool = (bool(lc.llama_supports_gpu_offload())
                                    and config.n_gpu_layers > lc.llama_model_n_layer(model))
        self.kv_unified: bool = self.output_on_gpu if config.kv_unified is None else config.kv_unified
        cparams.kv_unified = self.kv_unified
        cparams.type_k = config.kv_ggml_type
        cparams.type_v = config.kv_ggml_type
        cparams.no_perf = True
        # One output per sequence per step: what in-graph penalties need, and a smaller sampling graph.
        cparams.n_outputs_max_per_seq = 1
        cparams.flash_attn_type = (
            lc.LLAMA_FLASH_ATTN_TYPE_AUTO
            if config.flash_attn is None
            else lc.LLAMA_FLASH_ATTN_TYPE_ENABLED if config.flash_attn else lc.LLAMA_FLASH_ATTN_TYPE_DISABLED
        )
        ctx = lc.llama_init_from_model(model, cparams)
        if not ctx:
            lc.llama_model_free(model)
            raise ModelLoadError(
                f"llama.cpp could not create a context for {path} (n_ctx={config.n_ctx}, "
                f"n_parallel={config.n_parallel}, kv_type={config.kv_type}, flash_attn={config.flash_attn})"
            )
        self.ctx: int = ctx
        self.mem: int = lc.llama_get_memory(ctx)
        self.vocab: int = lc.llama_model_get_vocab(model)
        self.n_vocab: int = lc.llama_vocab_n_tokens(self.vocab)
        self.n_ctx: int = lc.llama_n_ctx(ctx)
        self.n_ctx_train: int = lc.llama_model_n_ctx_train(model)
        self.n_seq_max: int = lc.llama_n_seq_max(ctx)
        self.n_batch: int = lc.llama_n_batch(ctx)
        n_ctx_seq = lc.llama_n_ctx_seq(ctx)
        # As llama-server: a slot never runs past the context the model was trained for.
        self.n_ctx_seq: int = min(n_ctx_seq, self.n_ctx_train) if self.n_ctx_train > 0 else n_ctx_seq
        self.bos: int = lc.llama_vocab_bos(self.vocab)
        self.eos: int = lc.llama_vocab_eos(self.vocab)
        self.add_bos: bool = bool(lc.llama_vocab_get_add_bos(self.vocab))
        # A cached prefix can be cut at any position only in a plain KV cache (not SWA, not recurrent state).
        self.can_reuse_prefix: bool = (
            lc.llama_model_n_swa(model) == 0
            and not lc.llama_model_is_recurrent(model)
            and not lc.llama_model_is_hybrid(model)
        )
        self._pieces: list[bytes | None] = [None] * self.n_vocab
        self._eog: bytearray = bytearray(self.n_vocab)  # 0 unknown, 1 no, 2 yes
        self._eog_all: tuple[int, ...] | None = None
        # Our own handle on llama_get_logits_ith returning a plain address: a logits row becomes a numpy view
        # without a ctypes pointer object per call.
        self._logits_ith = lc._lib["llama_get_logits_ith"]
        self._logits_ith.argtypes = [ctypes.c_void_p, ctypes.c_int32]
        self._logits_ith.restype = ctypes.c_void_p
        self._row_type = ctypes.c_float * self.n_vocab
        self._closed = False

    # --- vocabulary -----------------------------------------------------------------------------------------

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        data = text.encode("utf-8")
        cap = len(data) + 8
        buf = (lc.llama_token * cap)()
        n = lc.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, parse_special)
        if n < 0:
            cap = -n
            buf = (lc.llama_token * cap)()
            n = lc.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, parse_special)
        ids = list(buf[:n])
        # Chat templates often write the BOS text themselves; do not start with two BOS tokens.
        if add_special and len(ids) >= 2 and ids[0] == self.bos and ids[1] == self.bos:
            del ids[0]
        return ids

    def piece(self, token: int) -> bytes:
        """The bytes of one token as generated text (control tokens render empty). Cached per token."""
        cached = self._pieces[token]
        if cached is not None:
            return cached
        buf = ctypes.create_string_buffer(64)  # per call: the engine thread and the event loop both look up
        n = lc.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
        if n < 0:
            bigger = ctypes.create_string_buffer(-n)
            n = lc.llama_token_to_piece(self.vocab, token, bigger, len(bigger), 0, False)
            data = bigger.raw[:n]
        else:
            data = buf.raw[:n]
        self._pieces[token] = data
        return data

    def detokenize(self, ids: list[int], special: bool = False) -> str:
        if not ids:
            return ""
        arr = (lc.llama_token * len(ids))(*ids)
        cap = len(ids) * 8 + 16
        buf = ctypes.create_string_buffer(cap)
        n = lc.llama_detokenize(self.vocab, arr, len(ids), buf, cap, False, special)
        if n < 0:
            cap = -n
            buf = ctypes.create_string_buffer(cap)
            n = lc.llama_detokenize(self.vocab, arr, len(ids), buf, cap, False, special)
        return buf.raw[:n].decode("utf-8", errors="replace")

    def is_eog(self, token: int) -> bool:
        state = self._eog[token]
        if state == 0:
            state = 2 if lc.llama_vocab_is_eog(self.vocab, token) else 1
            self._eog[token] = state
        return state == 2

    def eog_tokens(self) -> tuple[int, ...]:
        """All end-of-generation tokens (scans the vocabulary once)."""
        if self._eog_all is None:
            self._eog_all = tuple(t for t in range(self.n_vocab) if self.is_eog(t))
        return self._eog_all

    def token_text(self, token: int) -> str:
        """The vocabulary's text of a token (for special tokens such as BOS in chat templates)."""
        if token < 0 or token >= self.n_vocab:
            return ""
        raw = lc.llama_vocab_get_text(self.vocab, token)
        return raw.decode("utf-8", errors="replace") if raw else ""

    def meta(self, key: str) -> str | None:
        size = 256
        while True:
            buf = ctypes.create_string_buffer(size)
            n = lc.llama_model_meta_val_str(self.model, key.encode(), buf, size)
            if n < 0:
                return None
            if n < size:
                return buf.raw[:n].decode("utf-8", errors="replace")
            size = n + 1

    def chat_template(self) -> str | None:
        raw = lc.llama_model_chat_template(self.model, None)
        return raw.decode("utf-8", errors="replace") if raw else None

    # --- context --------------------------------------------------------------------------------------------

    def decode(self, batch: lc.llama_batch) -> int:
        return int(lc.llama_decode(self.ctx, batch))

    def synchronize(self) -> None:
        """Wait until the last llama_decode has finished on its device (and its outputs are on the host)."""
        lc.llama_synchronize(self.ctx)

    def set_sampler(self, seq: int, chain: int | None) -> bool:
        """Sample sequence `seq` with `chain` inside the decode graph (None: on the host again)."""
        return bool(lc.llama_set_sampler(self.ctx, seq, chain))

    def seq_rm(self, seq: int, p0: int = -1, p1: int = -1) -> bool:
        return bool(lc.llama_memory_seq_rm(self.mem, seq, p0, p1))

    def seq_cp(self, src: int, dst: int, p0: int = -1, p1: int = -1) -> None:
        lc.llama_memory_seq_cp(self.mem, src, dst, p0, p1)

    def seq_pos_max(self, seq: int) -> int:
        return int(lc.llama_memory_seq_pos_max(self.mem, seq))

    def logits(self, idx: int) -> np.ndarray:
        """Logits of batch index `idx` of the last decode (a writable view, valid until the next decode)."""
        addr = self._logits_ith(self.ctx, idx)
        if not addr:
            raise IndexError(f"no logits for batch index {idx}")
        return np.frombuffer(self._row_type.from_address(addr), dtype=np.float32)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        lc.llama_free(self.ctx)
        lc.llama_model_free(self.model)
