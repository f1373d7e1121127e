"""The scheduler's decision for one engine step, as a value the runner executes (vLLM v1's SchedulerOutput).

The scheduler (scheduler.py) decides; the runner (runner.py) fills llama.cpp's batch from the plan, decodes
and samples; the core (core.py) hands the sampled tokens back to the scheduler. Nothing in here touches
llama.cpp.
"""

from __future__ import annotations

from dataclasses import dataclass

from server.engine.request import Request


@dataclass(frozen=True, slots=True)
class ScheduledChunk:
    """What one request feeds into a step."""

    # the request; its slot is the llama.cpp sequence id of every token below
    req: Request
    # tokens fed: 1 for a decoding request, a prompt (or recompute) chunk otherwise
    n_tokens: int
    # position of the first of them, i.e. req.n_cached when planned (the tokens are req.tokens[start:])
    start: int
    # whether the step ends the request's pending tokens: then its logits are read and a token sampled
    wants_output: bool
    # a decoding request's draft (speculative decoding): fed after its last token, every row's logits read;
    # n_tokens counts it
    draft: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class StepPlan:
    """Which requests run in the next step and how many tokens each; who got in, who was pushed out."""

    # in batch order: every decoding request first (one token each, plus its draft), then prefill chunks
    chunks: tuple[ScheduledChunk, ...]
    # requests that got a slot for this step (new, or back after a preemption); their samplers start now
    admitted: tuple[Request, ...]
    # requests whose KV was dropped to make room while planning; they wait again and recompute
    preempted: tuple[Request, ...]
    # decoding requests (the first n_decode chunks); the rest of the chunks are prefill
    n_decode: int

    @property
    def n_tokens(self) -> int:
        """Tokens in the step: what llama_decode computes."""
        return sum(c.n_tokens for c in self.chunks)

    @property
    def n_outputs(self) -> int:
        return sum(1 for c in self.chunks if c.wants_output)

    @property
    def is_empty(self) -> bool:
        return not self.chunks

    @staticmethod
    def make_empty(preempted: tuple[Request, ...] = ()) -> StepPlan:
        return StepPlan(chunks=(), admitted=(), preempted=preempted, n_decode=0)
