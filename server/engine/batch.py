"""A reusable llama_batch over numpy buffers that the engine fills in place (no per-step allocation)."""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

import llama_cpp.llama_cpp as lc
import numpy as np


class TokenBatch:
    """Up to `capacity` tokens, each for one sequence. Fill with add_run/add_decodes, then decode `finish()`.

    llama_batch_init would allocate one seq_id array per token; here all seq ids live in one int32 buffer and
    the per-token pointers into it are set once, so a step only writes plain numpy slices.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.token = np.zeros(capacity, dtype=np.int32)
        self.pos = np.zeros(capacity, dtype=np.int32)
        self.n_seq_id = np.ones(capacity, dtype=np.int32)
        self.seq = np.zeros(capacity, dtype=np.int32)
        self.logits = np.zeros(capacity, dtype=np.int8)
        int32_p = ctypes.POINTER(ctypes.c_int32)
        seq_base = self.seq.ctypes.data
        self._seq_ptrs = (int32_p * capacity)(
            *[ctypes.cast(seq_base + 4 * i, int32_p) for i in range(capacity)])
        self.struct = lc.llama_batch(
            n_tokens=0,
            token=self.token.ctypes.data_as(int32_p),
            embd=None,
            pos=self.pos.ctypes.data_as(int32_p),
            n_seq_id=self.n_seq_id.ctypes.data_as(int32_p),
            seq_id=ctypes.cast(self._seq_ptrs, ctypes.POINTER(int32_p)),
            logits=self.logits.ctypes.data_as(ctypes.POINTER(ctypes.c_int8)),
        )
        self.n = 0

    def clear(self) -> None:
        self.n = 0

    @property
    def free(self) -> int:
        return self.capacity - self.n

    def add_decodes(self, tokens: Sequence[int], positions: Sequence[int], seqs: Sequence[int]) -> int:
        """One token per sequence, each wanting logits. Returns the batch index of the first."""
        start = self.n
        end = start + len(tokens)
        self.token[start:end] = tokens
        self.pos[start:end] = positions
        self.seq[start:end] = seqs
        self.logits[start:end] = 1
        self.n = end
        return start

    def add_run(self, tokens: Sequence[int], pos0: int, seq: int, want_logits: bool) -> int:
        """Consecutive tokens of one sequence from position pos0. Returns the batch index of the last."""
        start = self.n
        end = start + len(tokens)
        self.token[start:end] = tokens
        self.pos[start:end] = np.arange(pos0, pos0 + len(tokens), dtype=np.int32)
        self.seq[start:end] = seq
        self.logits[start:end] = 0
        if want_logits:
            self.logits[end - 1] = 1
        self.n = end
        return end - 1

    def add_verify(self, tokens: Sequence[int], pos0: int, seq: int) -> int:
        """A sequence's last token and its draft, every row wanting logits. Returns the batch index of the
        first."""
        start = self.n
        self.add_run(tokens, pos0, seq, True)
        self.logits[start: self.n] = 1
        return start

    def finish(self) -> lc.llama_batch:
        self.struct.n_tokens = self.n
        return self.struct
