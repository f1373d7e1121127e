"""One request inside the engine: its tokens, where its KV lives, and where its events go."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from typing import Any

from server.engine.detokenizer import IncrementalDetokenizer
from server.engine.sampling import Sampler
from server.engine.stops import StopMatcher
from server.engine.types import SamplingParams

_arrivals = itertools.count()


class EventSink:
    """The asyncio side of a sequence: the loop that awaits its events and the queue they land in. The
    sequences of one request with several choices share a sink, whose items then say their choice."""

    __slots__ = ("is_shared", "loop", "queue")

    def __init__(self, loop: asyncio.AbstractEventLoop, is_shared: bool = False) -> None:
        self.loop = loop
        self.is_shared = is_shared
        self.queue: asyncio.Queue[Any] = asyncio.Queue()

    def put(self, seq: Sequence, item: Any) -> None:
        self.queue.put_nowait((seq.choice, item) if self.is_shared else item)


class Sequence:
    """A request's state. Owned by the decode thread once submitted, except the `is_cancelled` flag.

    `tokens` is prompt + generated. The first `n_cached` of them are in the KV cache of slot `slot`; the rest
    are fed in the next steps (normally one: the token just sampled; all of them after a preemption). Logits
    are read only when a step feeds the last token, so prefill, decode and recompute are one code path.
    """

    __slots__ = (
        "arrival",
        "choice",
        "detok",
        "is_answered",
        "is_cancelled",
        "is_done",
        "is_finished",
        "leader",
        "logprobs",
        "n_cached",
        "n_prompt",
        "n_reused",
        "n_shared",
        "params",
        "sampler",
        "shared_from",
        "sink",
        "slot",
        "stops",
        "tokens",
    )

    def __init__(self, tokens: list[int], params: SamplingParams, sink: EventSink | None,
                 piece: Callable[[int], bytes], *, choice: int = 0, leader: Sequence | None = None) -> None:
        self.arrival = next(_arrivals)
        # Choices of one request: the first (the leader) computes the prompt, the others copy its KV.
        self.choice = choice
        self.leader = leader
        self.tokens = tokens
        self.n_prompt = len(tokens)
        self.params = params
        self.sink = sink
        self.n_cached = 0
        self.n_shared = 0  # leading cached tokens whose cells another slot owns (prefix copied from it)
        self.shared_from = -1
        self.n_reused = 0  # prompt tokens taken from a prefix cache instead of computed
        self.slot = -1
        self.sampler: Sampler | None = None
        self.detok = IncrementalDetokenizer(piece)
        self.stops = StopMatcher(params.stop)
        # is_done: no more steps for it (its last token is known); is_answered: its last event is built;
        # is_finished: out of the scheduler, slot and sampler given back.
        self.is_done = False
        self.is_answered = False
        self.is_finished = False
        self.is_cancelled = False
        self.logprobs = params.logprobs is not None

    @property
    def n_generated(self) -> int:
        return len(self.tokens) - self.n_prompt

    @property
    def n_pending(self) -> int:
        """Tokens not yet in the KV cache."""
        return len(self.tokens) - self.n_cached

    @property
    def n_owned_cells(self) -> int:
        return self.n_cached - self.n_shared

    def __repr__(self) -> str:
        return (f"Sequence(arrival={self.arrival}, slot={self.slot}, prompt={self.n_prompt}, "
                f"generated={self.n_generated}, cached={self.n_cached})")
