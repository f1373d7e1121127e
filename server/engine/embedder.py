"""Embeddings with a llama.cpp context of their own (embeddings on, the configured pooling) on the engine's
model: /v1/embeddings never waits for, or holds up, the decode loop.

The context is made on first use (a server that never embeds pays nothing for it) and serves one batch at a
time under a lock; the caller runs `embed` off the event loop. Several short inputs share a llama_decode,
each as its own sequence; vectors are L2-normalised, as OpenAI's and llama-server's are.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

import llama_cpp.llama_cpp as lc
import numpy as np

from server.engine.batch import TokenBatch
from server.engine.config import EngineConfig
from server.engine.errors import EmptyPromptError, EngineError, InvalidTokenError, PromptTooLongError
from server.llama import loader

# Inputs that share one llama_decode (each a sequence of the embedding context).
EMBED_SEQS = 8


@dataclass(frozen=True)
class Embeddings:
    vectors: tuple[np.ndarray, ...]
    prompt_tokens: int


class Embedder:
    """Pooled, normalised embeddings of token sequences, on the engine's model."""

    def __init__(self, model: int, config: EngineConfig, n_vocab: int) -> None:
        if config.pooling == "none":
            raise ValueError("embeddings are off: pooling is none")
        self._model = model
        self._config = config
        self._n_vocab = n_vocab
        self._lock = threading.Lock()
        self._ctx: int | None = None
        self._batch: TokenBatch | None = None
        self.n_ctx = config.n_ctx
        self.n_embd = lc.llama_model_n_embd(model)

    def _context(self) -> int:
        if self._ctx is None:
            params = loader.ContextParams(
                # Pooling needs a whole input in one ubatch: the batch is one sequence's context.
                n_ctx_total=self.n_ctx, n_batch=self.n_ctx, n_ubatch=self.n_ctx,
                n_threads=self._config.threads,
                n_threads_batch=self._config.threads_batch, n_seq_max=EMBED_SEQS, kv_unified=True,
                kv_type=self._config.kv_type, flash_attn=self._config.flash_attn, embeddings=True,
                pooling=self._config.pooling)
            try:
                self._ctx = loader.new_context(self._model, params, path=self._config.model_file())
            except loader.LlamaLoadError as exc:
                raise EngineError(str(exc)) from None
            self._batch = TokenBatch(self.n_ctx)
        return self._ctx

    def check(self, inputs: Sequence[Sequence[int]]) -> None:
        for tokens in inputs:
            if not tokens:
                raise EmptyPromptError()
            if len(tokens) > self.n_ctx:
                raise PromptTooLongError(len(tokens), 0, self.n_ctx)
            if any(t < 0 or t >= self._n_vocab for t in tokens):
                raise InvalidTokenError("input", self._n_vocab)

    def embed(self, inputs: Sequence[Sequence[int]]) -> Embeddings:
        """One vector per input (blocking: call it from a worker thread)."""
        self.check(inputs)
        vectors: list[np.ndarray] = []
        with self._lock:
            ctx = self._context()
            assert self._batch is not None
            start = 0
            while start < len(inputs):
                group = [list(inputs[start])]
                while (start + len(group) < len(inputs) and len(group) < EMBED_SEQS
                       and sum(map(len, group)) + len(inputs[start + len(group)]) <= self.n_ctx):
                    group.append(list(inputs[start + len(group)]))
                vectors += self._decode(ctx, group)
                start += len(group)
        return Embeddings(tuple(vectors), sum(map(len, inputs)))

    def _decode(self, ctx: int, group: list[list[int]]) -> list[np.ndarray]:
        assert self._batch is not None
        lc.llama_memory_clear(lc.llama_get_memory(ctx), True)
        self._batch.clear()
        for seq, tokens in enumerate(group):
            self._batch.add_run(tokens, 0, seq, True)
        self._batch.logits[: self._batch.n] = 1  # pooling reads every token's output
        rc = lc.llama_decode(ctx, self._batch.finish())
        if rc != 0:
            raise EngineError(f"llama_decode failed with status {rc} while embedding")
        out = []
        for seq in range(len(group)):
            ptr = lc.llama_get_embeddings_seq(ctx, seq)
            if not ptr:
                raise EngineError("llama.cpp returned no pooled embedding")
            vec = np.ctypeslib.as_array(ptr, shape=(self.n_embd,)).astype(np.float32)
            norm = float(np.linalg.norm(vec))
            out.append(vec / norm if norm > 0 else vec)
        return out

    def close(self) -> None:
        with self._lock:
            if self._ctx is not None:
                lc.llama_free(self._ctx)
                self._ctx = None
