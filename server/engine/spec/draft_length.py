"""How many tokens one sequence drafts next: it follows the sequence's own acceptance.

After a draft that was accepted whole the next may be two tokens longer (up to n_max); after a partial one it
is one longer than what was accepted (Hugging Face's assisted-generation heuristic, with the floor at what
was just accepted). A sequence whose acceptance stays low stops drafting for a while, twice as long each
time it fails again: a rejected draft costs its verification rows and nothing is won. Pure counts, no
llama.cpp: tested by feeding it outcomes.
"""

from __future__ import annotations

# The acceptance ratio is judged over at least this many drafted tokens (an exponential moving average).
JUDGE_AFTER = 16
EMA_WEIGHT = 0.2
# Steps a sequence with low acceptance stays without drafts the first time; doubled at every new failure.
PAUSE_STEPS = 16
PAUSE_STEPS_MAX = 512


class DraftLength:
    """One sequence's next draft length and its acceptance record."""

    __slots__ = ("_drafted_since", "_ema", "_pause", "_pause_next", "accept_min", "k", "n_max", "n_min")

    def __init__(self, n_min: int, n_max: int, accept_min: float) -> None:
        self.n_min = n_min
        self.n_max = n_max
        self.accept_min = accept_min
        self.k = n_max
        self._ema = 1.0
        self._drafted_since = 0
        self._pause = 0  # steps left without drafts
        self._pause_next = PAUSE_STEPS

    @property
    def is_paused(self) -> bool:
        return self._pause > 0

    def want(self) -> int:
        """Tokens to draft this step (0: none). A paused sequence counts the step down."""
        if self._pause > 0:
            self._pause -= 1
            return 0
        return self.k

    def record(self, drafted: int, accepted: int) -> None:
        """A verified draft: `accepted` of its `drafted` tokens matched the target."""
        if drafted <= 0:
            return
        self.k = min(self.n_max, self.k + 2) if accepted == drafted else max(self.n_min, accepted + 1)
        self._ema += EMA_WEIGHT * (accepted / drafted - self._ema)
        self._drafted_since += drafted
        if self._drafted_since >= JUDGE_AFTER and self._ema < self.accept_min:
            self._pause = self._pause_next
            self._pause_next = min(PAUSE_STEPS_MAX, self._pause_next * 2)
            self._ema = 1.0  # judged afresh after the pause
            self._drafted_since = 0
            self.k = self.n_min
