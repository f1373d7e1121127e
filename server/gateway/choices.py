"""The choices of one request as its deltas arrive, and the totals its usage reports.

Per choice index: text, logprobs, tool calls, finish and token counts; usage counts the prompt once and sums
the completions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from server.gateway.backends.base import Delta, TokenLogprob


@dataclass
class CallParts:
    """One tool call put together from its deltas."""

    id: str = ""
    name: str = ""
    arguments: str = ""


@dataclass
class Choice:
    index: int
    parts: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    calls: dict[int, CallParts] = field(default_factory=dict)
    finish_reason: str | None = None
    completion_tokens: int = 0

    @property
    def text(self) -> str:
        return "".join(self.parts)


class Choices:
    """Accumulates deltas per choice; `record` says whether the delta carried output (for token timing)."""

    def __init__(self, n: int) -> None:
        self.by_index = {i: Choice(i) for i in range(n)}

    def record(self, delta: Delta) -> bool:
        choice = self.by_index.get(delta.index)
        if choice is None:  # a backend that sent more choices than asked: keep them rather than drop them
            choice = self.by_index[delta.index] = Choice(delta.index)
        grew = bool(delta.text or delta.tool_calls) or delta.completion_tokens > choice.completion_tokens
        choice.parts.append(delta.text)
        choice.logprobs.extend(delta.logprobs)
        for piece in delta.tool_calls:
            call = choice.calls.setdefault(piece.index, CallParts())
            call.id = piece.id or call.id
            call.name = piece.name or call.name
            call.arguments += piece.arguments
        if delta.finish_reason is not None:
            choice.finish_reason = delta.finish_reason
            if delta.completion_tokens:
                # The last delta carries the backend's final count: it wins over the running estimate.
                choice.completion_tokens = delta.completion_tokens
        else:
            choice.completion_tokens = max(choice.completion_tokens, delta.completion_tokens)
        return grew

    @property
    def is_finished(self) -> bool:
        return all(c.finish_reason is not None for c in self.by_index.values())

    @property
    def finish_reason(self) -> str | None:
        """The first choice's, once every choice has finished."""
        return self.by_index[min(self.by_index)].finish_reason if self.is_finished else None

    @property
    def completion_tokens(self) -> int:
        return sum(c.completion_tokens for c in self.by_index.values())

    def ordered(self) -> list[Choice]:
        return [self.by_index[i] for i in sorted(self.by_index)]
