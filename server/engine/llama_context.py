"""One llama.cpp model and context, through llama-cpp-python's low-level bindings.

Loading goes through server/llama/loader.py (shared with the quantizer); everything else that touches
llama.cpp's context lives here (and in batch.py / sampling.py). Decode and memory operations are called from
the engine core's loop thread only; vocabulary look-ups are vocab.py's.
"""

from __future__ import annotations

import ctypes
import logging

import llama_cpp.llama_cpp as lc
import numpy as np

from server.engine.config import EngineConfig, cap_n_ctx
from server.engine.errors import ModelLoadError
from server.engine.types import Placement
from server.engine.vocab import Vocabulary
from server.llama import loader
from server.llama.offload import offload_layers

log = logging.getLogger(__name__)


class LlamaRuntime(Vocabulary):
    """A loaded model with one context of `n_parallel` sequences (server/llama/loader.py loads it); its
    vocabulary look-ups are Vocabulary's."""

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
                # A drafting sequence reads a row per draft token, and its last token's.
                n_outputs_max_per_seq=1 + config.spec_draft_n_max if config.speculates else 1,
            )
            try:
                ctx = loader.new_context(model, params, path=path)
            except loader.LlamaLoadError:
                loader.free(model)
                raise
        except loader.LlamaLoadError as exc:
            raise ModelLoadError(str(exc)) from None
        super().__init__(model)
        self.ctx: int = ctx
        n_layer = lc.llama_model_n_layer(model)
        supported = bool(lc.llama_supports_gpu_offload())
        every = offload_layers(n_layer)
        wanted = every if config.n_gpu_layers < 0 else min(config.n_gpu_layers, every)
        self.placement = Placement(devices=loader.devices(), gpu_offload_supported=supported, n_layer=n_layer,
                                   n_gpu_layers=wanted if supported else 0, output_on_gpu=self.output_on_gpu,
                                   kv_unified=self.kv_unified)
        self.mem: int = lc.llama_get_memory(ctx)
        self.kv_cells: int = lc.llama_n_ctx(ctx)  # llama.cpp's n_ctx: the cells of all sequences, padded
        self.n_ctx_train: int = lc.llama_model_n_ctx_train(model)
        self.n_seq_max: int = lc.llama_n_seq_max(ctx)
        self.n_batch: int = lc.llama_n_batch(ctx)
        # llama.cpp pads a split cache's streams to 256 cells and a unified one is the whole pool: a sequence
        # may use n_ctx tokens (capped above at the training context).
        self.n_ctx: int = min(lc.llama_n_ctx_seq(ctx), n_ctx)
        # A cached prefix can be cut at any position only in a plain KV cache (not SWA, not recurrent state).
        self.can_reuse_prefix: bool = (
            lc.llama_model_n_swa(model) == 0
            and not lc.llama_model_is_recurrent(model)
            and not lc.llama_model_is_hybrid(model)
        )
        # Our own handle on llama_get_logits_ith returning a plain address: a logits row becomes a numpy view
        # without a ctypes pointer object per call.
        self._logits_ith = lc._lib["llama_get_logits_ith"]
        self._logits_ith.argtypes = [ctypes.c_void_p, ctypes.c_int32]
        self._logits_ith.restype = ctypes.c_void_p
        self._row_type = ctypes.c_float * self.n_vocab
        self._closed = False

    # --- context --------------------------------------------------------------------------------------------

    def decode(self, batch: lc.llama_batch) -> int:
        return int(lc.llama_decode(self.ctx, batch))

    def set_threads(self, n_threads: int) -> None:
        """CPU threads for the next steps (decoding and prompts alike)."""
        lc.llama_set_n_threads(self.ctx, n_threads, n_threads)

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
        return np.frombuffer(memoryview(self._row_type.from_address(addr)), dtype=np.float32)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        loader.free(self.model, self.ctx)
