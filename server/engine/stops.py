"""Stop strings over a stream of text deltas: text that could begin a stop string is held back."""

from __future__ import annotations


class StopMatcher:
    """Feed text deltas; get back what is safe to emit and whether a stop string was hit.

    The stop string itself and everything after it are never emitted. Text that may be the start of a stop
    string waits until the next delta settles it (or `flush` at the end releases it).
    """

    __slots__ = ("_held", "_max_hold", "_stops")

    def __init__(self, stops: tuple[str, ...]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._max_hold = max((len(s) for s in self._stops), default=1) - 1
        self._held = ""

    @property
    def is_active(self) -> bool:
        return bool(self._stops)

    def feed(self, text: str) -> tuple[str, bool]:
        if not self._stops:
            return text, False
        buf = self._held + text
        first = -1
        for stop in self._stops:
            at = buf.find(stop)
            if at >= 0 and (first < 0 or at < first):
                first = at
        if first >= 0:
            self._held = ""
            return buf[:first], True
        hold = 0
        for k in range(min(self._max_hold, len(buf)), 0, -1):
            tail = buf[-k:]
            if any(stop.startswith(tail) for stop in self._stops):
                hold = k
                break
        self._held = buf[len(buf) - hold:] if hold else ""
        return buf[: len(buf) - hold], False

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held
