"""One llama.cpp model and context, through llama-cpp-python's low-level bindings.

Loading goes through server/llama/loader.py (shared with the quantizer); everything else that touches
llama.cpp pointers lives here (and in batch.py / sampling.py). Tokenization and
vocabulary look-ups are thread-safe in llama.cpp; decode and memory operations are called from the engine's
decode thread only.
"""

from __future__ import annotations

import ctypes
import logging

import llama_cpp.llama_cpp as lc
import numpy as np

from server.engine.config import EngineConfig, cap_n_ctx
from server.engine.errors import ModelLoadError
from server.engine.types import Placement
from server.llama import loader
from server.llama.offload import offload_layers

log = logging.getLogger(__name__)


class LlamaRuntime:
    """A loaded model with one context of `n_parallel` sequences (server/llama/loader.py loads it)."""

    def __init__(self, config: EngineConfig) -> None:
        path = config.model_file()
        loader.init_backend(config.verbose)
        try:
            model = loader.load_model(
                path, n_gpu_layers=config.n_gpu_layers, use_extra_bufts=config.cpu_extra_bufts
            )
            self.output_on_gpu: bool = loader.output_on_gpu(model, config.n_gpu_layers)
            self.kv_unified: bool = config.unified_on(self.output_on_gpu)
            # A sequence never runs past the context the model was trained for (as llama-server's slots), so
            # no cell beyond it is allocated either.
            n_ctx = cap_n_ctx(config.n_ctx, lc.llama_model_n_ctx_train(model))
            if n_ctx < config.n_ctx:
                log.info("n_ctx %d is more than %s was trained for: %d per sequence", config.n_ctx,
                         path.name, n_ctx)
            params = loader.ContextParams(
                n_ctx_total=n_ctx * config.n_parallel,  # the cells of all sequences; a sequence gets n_ctx
                n_batch=config.n_batch,
                n_ubatch=config.n_ubatch,
                n_threads=config.threads,
                n_threads_batch=config.threads_batch,
                n_seq_max=config.n_parallel,
                kv_unified=self.kv_unified,
                kv_type=config.kv_type,
                flash_attn=config.flash_attn,
                # One output per sequence per step: what in-graph penalties need; a smaller sampling graph.
                n_outputs_max_per_seq=1,
            )
            try:
                ctx = loader.new_context(model, params, path=path)
            except loader.LlamaLoadError:
                loader.free(model)
                raise
        except loader.LlamaLoadError as exc:
            raise ModelLoadError(str(exc)) from None
        self.model: int = model
        self.ctx: int = ctx
        n_layer = lc.llama_model_n_layer(model)
        supported = bool(lc.llama_supports_gpu_offload())
        every = offload_layers(n_layer)
        wanted = every if config.n_gpu_layers < 0 else min(config.n_gpu_layers, every)
        self.placement = Placement(devices=loader.devices(), gpu_offload_supported=supported, n_layer=n_layer,
                                   n_gpu_layers=wanted if supported else 0, output_on_gpu=self.output_on_gpu,
                                   kv_unified=self.kv_unified)
        self.mem: int = lc.llama_get_memory(ctx)
        self.vocab: int = lc.llama_model_get_vocab(model)
        self.n_vocab: int = lc.llama_vocab_n_tokens(self.vocab)
        self.kv_cells: int = lc.llama_n_ctx(ctx)  # llama.cpp's n_ctx: the cells of all sequences, padded
        self.n_ctx_train: int = lc.llama_model_n_ctx_train(model)
        self.n_seq_max: int = lc.llama_n_seq_max(ctx)
        self.n_batch: int = lc.llama_n_batch(ctx)
        # llama.cpp pads a split cache's streams to 256 cells and a unified one is the whole pool: a sequence
        # may use n_ctx tokens (capped above at the training context).
        self.n_ctx: int = min(lc.llama_n_ctx_seq(ctx), n_ctx)
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
        loader.free(self.model, self.ctx)
