"""Fixtures of the engine tests: a serial greedy reference decoder (`serial_reference`), the prompts
(`questions`), the thread count (`engine_threads`) and `drive`, the helpers that run a request to its end."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

import llama_cpp.llama_cpp as lc
import numpy as np
import pytest

from server.engine.config import EngineConfig
from server.engine.engine import Engine
from server.engine.llama_context import LlamaRuntime
from server.engine.types import SamplingParams, StreamEvent

# The engine's own default (one thread per usable CPU): with llama.cpp's waiting threads asleep rather than
# spinning (server/__init__.py), a shared CI machine slows a step down, it does not stall it.
THREADS = None

QUESTIONS = (
    "Name three colors.",
    "What is 2+2?",
    "Tell me a joke.",
    "Where is Paris?",
    "Write a haiku about the sea.",
    "What is Python?",
    "Count to five.",
    "Say hello in French.",
)


@dataclass(frozen=True)
class Result:
    text: str
    tokens: tuple[int, ...]
    finish_reason: str | None
    events: tuple[StreamEvent, ...]


class Drive:
    """Run requests on an engine to their end: `drive.run(drive.collect(engine, prompt, drive.greedy(8)))`."""

    @staticmethod
    async def collect(engine: Engine, prompt: str | Sequence[int], params: SamplingParams) -> Result:
        events = [ev async for ev in engine.generate(prompt, params)]
        return Result(
            text="".join(e.text for e in events),
            tokens=tuple(t for e in events for t in e.token_ids),
            finish_reason=events[-1].finish_reason if events else None,
            events=tuple(events),
        )

    @staticmethod
    def run(coro):  # type: ignore[no-untyped-def]
        return asyncio.run(coro)

    @staticmethod
    def greedy(max_tokens: int, ignore_eos: bool = False) -> SamplingParams:
        return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=ignore_eos)


class SerialReference:
    """Greedy decoding of one sequence at a time with plain llama.cpp calls and numpy argmax (no engine code
    beyond loading): the ground truth the engine's batched output must equal."""

    def __init__(self, model_path: str, n_ctx: int = 2048, flash_attn: str = "auto") -> None:
        self.rt = LlamaRuntime(EngineConfig(model_path=model_path, n_ctx=n_ctx, n_parallel=1, n_batch=512,
                                            n_ubatch=512, n_threads=THREADS, flash_attn=flash_attn))
        self.batch = lc.llama_batch_init(512, 0, 1)

    def _decode(self, tokens: Sequence[int], pos0: int) -> np.ndarray:
        b = self.batch
        for i, tok in enumerate(tokens):
            b.token[i] = tok
            b.pos[i] = pos0 + i
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = 0
            b.logits[i] = 0
        b.logits[len(tokens) - 1] = 1
        b.n_tokens = len(tokens)
        assert lc.llama_decode(self.rt.ctx, b) == 0
        return np.ctypeslib.as_array(lc.llama_get_logits_ith(self.rt.ctx, len(tokens) - 1),
                                     shape=(self.rt.n_vocab,)).copy()

    def generate(self, prompt: Sequence[int], max_tokens: int, ignore_eos: bool = False,
                 chunk: int = 512) -> tuple[int, ...]:
        """Greedy tokens for `prompt`, prefilled `chunk` tokens per llama_decode."""
        self.rt.seq_rm(0)
        eog = list(self.rt.eog_tokens())
        out: list[int] = []
        for start in range(0, len(prompt), chunk):
            logits = self._decode(list(prompt[start: start + chunk]), start)
        pos = len(prompt)
        while True:
            if ignore_eos:
                logits[eog] = -np.inf
            tok = int(np.argmax(logits))
            out.append(tok)
            if len(out) >= max_tokens or (not ignore_eos and self.rt.is_eog(tok)):
                return tuple(out)
            logits = self._decode([tok], pos)
            pos += 1

    def close(self) -> None:
        lc.llama_batch_free(self.batch)
        self.rt.close()


@pytest.fixture(scope="session")
def drive() -> type[Drive]:
    return Drive


@pytest.fixture(scope="session")
def questions() -> tuple[str, ...]:
    return QUESTIONS


@pytest.fixture(scope="session")
def engine_threads() -> int | None:
    return THREADS


@pytest.fixture(scope="session")
def serial_reference() -> type[SerialReference]:
    """SerialReference(model_path, n_ctx=2048, flash_attn="auto"); close() it when done."""
    return SerialReference
