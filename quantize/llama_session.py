"""A model and one context on llama.cpp's low-level API, for verification, perplexity and decode speed.

Only what the quantization pipeline needs: tokenize, decode a batch with logits where asked, greedy decoding.
Loading goes through server/llama/loader.py (the engine's loader too); llama.cpp's log is captured for the
session's life so that a failure reports llama.cpp's own reason in one line.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import llama_cpp
import numpy as np

from server.llama import loader
from server.llama.loader import LlamaLoadError
from server.llama.log import LogCapture, captured_llama_log

__all__ = ["GreedyRun", "LlamaLoadError", "LlamaSession", "default_threads"]


@dataclass(frozen=True)
class GreedyRun:
    """Tokens decoded greedily after a prompt, and the time spent on the one-token steps."""

    prompt_tokens: tuple[int, ...]
    tokens: tuple[int, ...]
    text: str
    decode_steps: int
    decode_seconds: float

    @property
    def tokens_per_second(self) -> float:
        """One-token decode steps per second (the prompt's batch is not counted)."""
        return self.decode_steps / self.decode_seconds if self.decode_seconds > 0 else 0.0


def default_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


class LlamaSession:
    """Context manager: `with LlamaSession(path, n_ctx=256) as s: s.greedy("Hello", 8)`."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        n_ctx: int = 512,
        n_batch: int = 512,
        n_threads: int | None = None,
        n_gpu_layers: int | None = None,
        use_extra_bufts: bool | None = None,
    ) -> None:
        self.path = Path(path)
        self.n_ctx = n_ctx
        self.n_batch = min(n_batch, n_ctx)
        self.n_threads = n_threads or default_threads()
        # Offload everything when llama.cpp was built with a GPU backend; CPU otherwise.
        self.n_gpu_layers = (
            (99 if llama_cpp.llama_supports_gpu_offload() else 0) if n_gpu_layers is None else n_gpu_layers
        )
        # None: the loader's AMX guard decides, as in the engine.
        self.use_extra_bufts = use_extra_bufts
        self._model: Any = None
        self._ctx: Any = None
        self.vocab: Any = None
        self.n_vocab = 0
        self._stack = contextlib.ExitStack()
        self.log: LogCapture | None = None

    def __enter__(self) -> LlamaSession:
        loader.init_backend()
        # llama.cpp's log is kept (not printed) for the session's life: errors quote it.
        self.log = log = self._stack.enter_context(captured_llama_log())
        try:
            self._model = loader.load_model(
                self.path, n_gpu_layers=self.n_gpu_layers, use_extra_bufts=self.use_extra_bufts, log=log
            )
            params = loader.ContextParams(
                n_ctx_total=self.n_ctx,  # one sequence: its context is all the cells there are
                n_batch=self.n_batch,
                n_ubatch=self.n_batch,
                n_threads=self.n_threads,
                n_threads_batch=self.n_threads,
            )
            self._ctx = loader.new_context(self._model, params, path=self.path, log=log)
        except BaseException:
            self.close()
            raise
        self.vocab = llama_cpp.llama_model_get_vocab(self._model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        loader.free(self._model, self._ctx)
        self._model = self._ctx = None
        self._stack.close()

    # ---- text ----------------------------------------------------------------------------------------------

    def tokenize(self, text: str, *, add_special: bool = True) -> list[int]:
        data = text.encode("utf-8")
        n_max = len(data) + 16
        buf = (llama_cpp.llama_token * n_max)()
        n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, n_max, add_special, False)
        if n < 0:  # buffer too small: -n is the size needed
            n_max = -n
            buf = (llama_cpp.llama_token * n_max)()
            n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, n_max, add_special, False)
        return list(buf[:n])

    def detokenize(self, tokens: list[int] | tuple[int, ...]) -> str:
        out = b""
        piece = ctypes.create_string_buffer(256)
        for t in tokens:
            n = llama_cpp.llama_token_to_piece(self.vocab, t, piece, len(piece), 0, False)
            out += piece.raw[: max(n, 0)]
        return out.decode("utf-8", errors="replace")

    @property
    def bos(self) -> int | None:
        return (
            int(llama_cpp.llama_vocab_bos(self.vocab))
            if llama_cpp.llama_vocab_get_add_bos(self.vocab)
            else None
        )

    # ---- decoding ------------------------------------------------------------------------------------------

    def clear(self) -> None:
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self._ctx), True)

    def decode(self, tokens: list[int], pos0: int, logits_from: int) -> np.ndarray[Any, Any]:
        """Decode `tokens` at positions pos0.. (sequence 0); return float32 logits of tokens[logits_from:]."""
        outputs: list[np.ndarray[Any, Any]] = []
        for start in range(0, len(tokens), self.n_batch):
            chunk = tokens[start : start + self.n_batch]
            batch = llama_cpp.llama_batch_init(len(chunk), 0, 1)
            try:
                n_out = 0
                for i, tok in enumerate(chunk):
                    batch.token[i] = tok
                    batch.pos[i] = pos0 + start + i
                    batch.n_seq_id[i] = 1
                    batch.seq_id[i][0] = 0
                    want = start + i >= logits_from
                    batch.logits[i] = want
                    n_out += want
                batch.n_tokens = len(chunk)
                rc = llama_cpp.llama_decode(self._ctx, batch)
                if rc != 0:
                    reason = self.log.last_error() if self.log else None
                    raise RuntimeError(f"llama_decode returned {rc}: {reason or 'no reason logged'}")
                if n_out:
                    ptr = llama_cpp.llama_get_logits(self._ctx)
                    arr = np.ctypeslib.as_array(ptr, shape=(n_out, self.n_vocab))
                    outputs.append(arr.copy())
            finally:
                llama_cpp.llama_batch_free(batch)
        if not outputs:
            return np.empty((0, self.n_vocab), dtype=np.float32)
        return np.concatenate(outputs)

    def greedy(self, prompt: str | list[int], n_tokens: int, *, stop_at_eog: bool = True) -> GreedyRun:
        """Greedy decoding of up to `n_tokens` after `prompt` (text, or tokens).

        With stop_at_eog False it runs the full count (a fixed amount of work, for speed measurements).
        """
        self.clear()
        prompt_tokens = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        if len(prompt_tokens) >= self.n_ctx:
            raise ValueError(f"the prompt has {len(prompt_tokens)} tokens; the context holds {self.n_ctx}")
        if not prompt_tokens:
            raise ValueError("the prompt has no tokens")
        logits = self.decode(prompt_tokens, 0, len(prompt_tokens) - 1)[-1]
        out: list[int] = []
        pos = len(prompt_tokens)
        seconds = 0.0
        steps = 0
        for i in range(n_tokens):
            if not np.all(np.isfinite(logits)):
                raise RuntimeError("the model produced non-finite logits")
            tok = int(np.argmax(logits))
            out.append(tok)
            is_last = i == n_tokens - 1 or pos >= self.n_ctx
            if is_last or (stop_at_eog and llama_cpp.llama_vocab_is_eog(self.vocab, tok)):
                break
            t0 = time.perf_counter()
            logits = self.decode([tok], pos, 0)[-1]
            seconds += time.perf_counter() - t0
            steps += 1
            pos += 1
        return GreedyRun(tuple(prompt_tokens), tuple(out), self.detokenize(out), steps, seconds)
