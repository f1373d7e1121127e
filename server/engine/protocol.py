"""Every message between the engine's front (the gateway's process) and its core (the process that owns
llama.cpp), in one module (SGLang's io_struct.py).

The front tokenizes, detokenizes and watches stop strings; the core schedules, decodes and samples. Token ids
go in, token ids come out: the core never formats text, JSON or SSE. Messages cross a pipe pickled; the one
sent every step (StepOutputs) pickles as plain tuples, which costs a few microseconds per step where
dataclass or NamedTuple instances cost 25x more (bench/core_messages.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np

from server.engine.stats import EngineStats
from server.engine.types import Placement, SamplingParams

# Why a choice ended, as the core says it: an end-of-generation token, max_tokens, an abort, a failure.
CoreFinish = Literal["eog", "length", "aborted", "error"]

# --- front -> core ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AddRequest:
    """Generate from `prompt`, one choice per SamplingParams; the choices share the prompt's KV."""

    req_id: int
    prompt: tuple[int, ...]
    params: tuple[SamplingParams, ...]


@dataclass(frozen=True, slots=True)
class AbortRequests:
    """Stop a request's choices (`choices` empty: all of them) and free their KV; nothing more is sent for
    them. `finished`: the front ended them itself (a stop string matched), so they count as finished and
    their slot keeps the KV for prefix reuse; otherwise they were cancelled (client gone, shutdown)."""

    req_id: int
    choices: tuple[int, ...] = ()
    finished: bool = False


@dataclass(frozen=True, slots=True)
class EmbedRequest:
    """Pooled, L2-normalised embeddings of token sequences (on a context of their own, off the step loop)."""

    req_id: int
    inputs: tuple[tuple[int, ...], ...]


@dataclass(frozen=True, slots=True)
class Shutdown:
    """Fail what is in flight, free llama.cpp and exit."""


ToCore = AddRequest | AbortRequests | EmbedRequest | Shutdown

# --- core -> front ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CoreInfo:
    """Facts about the loaded model and context, read once after loading (llama-server's
    server_context_meta)."""

    pid: int
    n_ctx: int  # tokens one sequence may use (capped at the training context, as llama.cpp rounds it)
    n_slots: int
    kv_cells: int
    n_vocab: int
    placement: Placement


@dataclass(frozen=True, slots=True)
class CoreReady:
    """Loaded: the model's facts, and the state to start from."""

    info: CoreInfo
    stats: EngineStats


@dataclass(frozen=True, slots=True)
class CoreFailed:
    """The core could not load (`load`, `does_not_fit`) or its loop died (`loop`); it exits after this."""

    kind: Literal["load", "does_not_fit", "loop"]
    message: str


class TokenOutput(NamedTuple):
    """One new token of one choice. `finish` is set on its last; logprob/top only when asked for."""

    req_id: int
    choice: int
    token: int
    finish: CoreFinish | None = None
    logprob: float | None = None
    top: tuple[tuple[int, float], ...] = ()


def _step_from_wire(outputs: tuple[tuple[object, ...], ...], n_tokens: int, n_seqs: int,
                    stats: EngineStats | None) -> StepOutputs:
    return StepOutputs(tuple(TokenOutput._make(o) for o in outputs), n_tokens, n_seqs, stats)


@dataclass(frozen=True, slots=True)
class StepOutputs:
    """What one step produced: a token per choice that wanted one, and the step's size (tokens fed,
    sequences in it). `stats` rides along when a choice finished or enough time passed since the last."""

    outputs: tuple[TokenOutput, ...]
    n_tokens: int
    n_seqs: int
    stats: EngineStats | None = None

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return _step_from_wire, (tuple(map(tuple, self.outputs)), self.n_tokens, self.n_seqs, self.stats)


@dataclass(frozen=True, slots=True)
class ChoiceFailed:
    """One choice could not run (its sampler chain did not build): it ends with `message`."""

    req_id: int
    choice: int
    message: str


@dataclass(frozen=True, slots=True)
class EmbedResult:
    req_id: int
    vectors: tuple[np.ndarray, ...] = ()
    prompt_tokens: int = 0
    error: str | None = None


@dataclass(frozen=True, slots=True)
class StatsUpdate:
    stats: EngineStats


ToFront = CoreReady | CoreFailed | StepOutputs | ChoiceFailed | EmbedResult | StatsUpdate
