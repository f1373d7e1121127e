"""The front's side of one request: token ids from the core become text deltas, stop strings end a choice.

Text is held back while it could be the start of a stop string and never splits a UTF-8 character; the last
event of a choice carries everything still held back (minus a stop string that matched). The core decides
the ends it can see in token ids (an end-of-generation token, max_tokens); a stop string only shows in the
text, so the front decides it and tells the core to stop that choice.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

from server.engine.detokenizer import IncrementalDetokenizer
from server.engine.errors import EngineError
from server.engine.protocol import TokenOutput
from server.engine.stops import StopMatcher
from server.engine.types import FinishReason, SamplingParams, StreamEvent


class ChoiceText:
    """One choice's text so far: its detokenizer, its stop strings and its count of generated tokens."""

    __slots__ = ("detok", "finished", "n_generated", "stops")

    def __init__(self, params: SamplingParams, piece: Callable[[int], bytes]) -> None:
        self.detok = IncrementalDetokenizer(piece)
        self.stops = StopMatcher(params.stop)
        self.n_generated = 0
        self.finished = False

    def event(self, out: TokenOutput, n_prompt: int) -> StreamEvent:
        """The event for the choice's newest token. A stop string that matched gives finish_reason "stop"
        even where the core had not ended the choice (then `stopped_here` is set)."""
        self.n_generated += 1
        finish: FinishReason | None = None
        stopped = False
        if out.finish == "eog":
            finish, text = "stop", ""  # the end-of-generation token itself renders as nothing
        else:
            text = self.detok.push(out.token)
            if self.stops.is_active:
                text, stopped = self.stops.feed(text)
                if stopped:
                    finish = "stop"
            if finish is None and out.finish == "length":
                finish = "length"
        if finish is not None and not stopped:
            tail = self.detok.flush()
            if self.stops.is_active:
                more, stopped = self.stops.feed(tail)
                text += more if stopped else more + self.stops.flush()
                if stopped:
                    finish = "stop"
            else:
                text += tail
        if finish is not None:
            self.finished = True
        logprobs = (out.logprob,) if out.logprob is not None else ()
        top = (out.top,) if out.top else ()
        return StreamEvent(text, (out.token,), finish, n_prompt, self.n_generated, logprobs, top)


class FrontRequest:
    """A request between the front and the core: its choices' text state and the queue its events land in.

    Items in `queue` are StreamEvents (or `(choice, event)` pairs when `is_shared`, for `n` > 1) and
    exceptions to raise in the consumer. Lives on the event loop the front reads the core on.
    """

    __slots__ = ("choices", "is_shared", "n_prompt", "queue", "req_id")

    def __init__(self, req_id: int, n_prompt: int, params: Sequence[SamplingParams],
                 piece: Callable[[int], bytes], *, is_shared: bool) -> None:
        self.req_id = req_id
        self.n_prompt = n_prompt
        self.is_shared = is_shared
        self.choices = [ChoiceText(p, piece) for p in params]
        self.queue: asyncio.Queue[Any] = asyncio.Queue()

    @property
    def is_finished(self) -> bool:
        return all(c.finished for c in self.choices)

    def on_token(self, out: TokenOutput) -> bool:
        """Take one core output. True when a stop string ended a choice the core still runs (the front must
        tell the core to stop it)."""
        choice = self.choices[out.choice]
        if choice.finished:
            return False  # tokens the core made before it heard of a stop string: not the client's
        if out.finish == "error":
            self.fail(out.choice, EngineError("the engine failed on this request"))
            return False
        event = self.put_event(out.choice, choice.event(out, self.n_prompt))
        return event.finish_reason is not None and out.finish is None

    def put_event(self, choice: int, event: StreamEvent) -> StreamEvent:
        self.queue.put_nowait((choice, event) if self.is_shared else event)
        return event

    def fail(self, choice: int | None, error: BaseException) -> None:
        """End one choice (None: every open one) with `error`, raised in the consumer."""
        for i, c in enumerate(self.choices):
            if (choice is None or i == choice) and not c.finished:
                c.finished = True
                self.queue.put_nowait((i, error) if self.is_shared else error)
