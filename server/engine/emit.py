"""What one generated token means for its sequence: its text delta, stop strings, and whether it ends it."""

from __future__ import annotations

from server.engine.sequence import Sequence
from server.engine.types import FinishReason, StreamEvent

TopLogprobs = tuple[tuple[tuple[int, float], ...], ...]


def ends_on(seq: Sequence, token: int, is_eog: bool) -> bool:
    """Whether `token` (already appended to seq.tokens) ends the sequence whatever its text: an
    end-of-generation token, or the last token max_tokens allows. Stop strings show only in the text."""
    return (is_eog and not seq.params.ignore_eos) or seq.n_generated >= seq.params.max_tokens


def token_event(seq: Sequence, token: int, is_eog: bool, logprobs: tuple[float, ...] = (),
                top_logprobs: TopLogprobs = ()) -> StreamEvent:
    """The event for `token`, the sequence's newest (already in seq.tokens). Marks the sequence done and
    answered when this is its last event.

    Text is held back while it could be the start of a stop string and never splits a UTF-8 character; the
    last event of a sequence carries everything still held back (minus a stop string that matched).
    """
    params = seq.params
    finish: FinishReason | None = None
    stopped = False
    if is_eog and not params.ignore_eos:
        finish, text = "stop", ""
    else:
        text = seq.detok.push(token)
        if seq.stops.is_active:
            text, stopped = seq.stops.feed(text)
            if stopped:
                finish = "stop"
    if finish is None and seq.n_generated >= params.max_tokens:
        finish = "length"
    if finish is not None and not stopped:
        tail = seq.detok.flush()
        if seq.stops.is_active:
            more, stopped = seq.stops.feed(tail)
            text += more if stopped else more + seq.stops.flush()
            if stopped:
                finish = "stop"
        else:
            text += tail
    if finish is not None:
        seq.is_done = seq.is_answered = True
    return StreamEvent(text, (token,), finish, seq.n_prompt, seq.n_generated, logprobs, top_logprobs)
