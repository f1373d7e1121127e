"""One request inside the engine core: its tokens, where its KV lives, and one status for its whole life.

The front (engine.py) owns the text side of a request (detokenizing, stop strings); the core owns this:
token ids, the slot and cells its KV takes, its sampler chain, and how far it has got. A request's life is
one ordered enum, so "finished" is one comparison and the finish reason follows from the status (vLLM v1's
`RequestStatus`).
"""

from __future__ import annotations

import enum
import itertools
from typing import TYPE_CHECKING

from server.engine.protocol import CoreFinish
from server.engine.types import SamplingParams

if TYPE_CHECKING:
    from server.engine.sampling import Sampler
    from server.engine.spec.seq_state import SpecSeq

_arrivals = itertools.count()


class RequestStatus(enum.IntEnum):
    """Where a request is. Every status from FINISHED_STOPPED on is final."""

    WAITING = 0  # queued for a slot (new, or put back by a preemption: it recomputes what it had)
    RUNNING = 1  # holds a slot; its pending tokens go into the next steps
    FINISHED_STOPPED = 2  # sampled an end-of-generation token
    FINISHED_LENGTH = 3  # reached max_tokens
    FINISHED_ABORTED = 4  # the front cancelled it (client gone, stop string, shutdown)
    FINISHED_ERROR = 5  # llama.cpp or its sampler failed on it

    @property
    def is_finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED

    @property
    def finish_reason(self) -> CoreFinish | None:
        """The wire name of a final status (protocol.TokenOutput.finish), None while it runs."""
        return _FINISH_REASONS.get(self)


_FINISH_REASONS: dict[RequestStatus, CoreFinish] = {
    RequestStatus.FINISHED_STOPPED: "eog",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "aborted",
    RequestStatus.FINISHED_ERROR: "error",
}


class Request:
    """One choice of one client request, as the core schedules it.

    `tokens` is prompt + generated. The first `n_cached` are in the KV cache of slot `slot`; the rest are fed
    in the next steps (normally one: the token just sampled; all of them after a preemption). Logits are read
    only when a step feeds the last token, so prefill, decode and recompute are one code path. The choices of
    a request with `n` > 1 share its prompt: the first (the leader) computes it, the others copy its KV.
    """

    __slots__ = (
        "arrival",
        "choice",
        "leader",
        "n_cached",
        "n_prompt",
        "n_reused",
        "n_shared",
        "params",
        "req_id",
        "sampler",
        "shared_from",
        "slot",
        "spec",
        "status",
        "tokens",
        "wants_logprobs",
    )

    def __init__(self, req_id: int, tokens: list[int], params: SamplingParams, *, choice: int = 0,
                 leader: Request | None = None) -> None:
        self.req_id = req_id
        self.choice = choice
        self.arrival = next(_arrivals)
        self.leader = leader
        self.tokens = tokens
        self.n_prompt = len(tokens)
        self.params = params
        self.status = RequestStatus.WAITING
        self.n_cached = 0
        self.n_shared = 0  # leading cached tokens whose cells another slot owns (prefix copied from it)
        self.shared_from = -1
        self.n_reused = 0  # prompt tokens taken from a prefix cache instead of computed
        self.slot = -1
        self.sampler: Sampler | None = None
        self.spec: SpecSeq | None = None  # speculative decoding's state, where this request drafts
        self.wants_logprobs = params.logprobs is not None

    @property
    def key(self) -> tuple[int, int]:
        """What the front calls this request by: its id and its choice."""
        return self.req_id, self.choice

    @property
    def is_finished(self) -> bool:
        return self.status >= RequestStatus.FINISHED_STOPPED

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
        return (f"Request(id={self.req_id}/{self.choice}, {self.status.name}, slot={self.slot}, "
                f"prompt={self.n_prompt}, generated={self.n_generated}, cached={self.n_cached})")
