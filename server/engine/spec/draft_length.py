"""How many tokens one sequence drafts next: as many as pay for their verification, given the sequence's own
acceptance and what one more token in a step costs.

Each draft token is accepted with a probability `alpha` (the sequence's per-token acceptance, a moving
average over the positions its drafts were judged at), so a draft of k tokens yields
(1 - alpha^(k+1)) / (1 - alpha) tokens in one step. A step with one more token costs `r` of a one-token
step (r = b*B / (a + b*B) for a step of B decoding sequences whose time is a + b*tokens, so r grows with the
batch). The length is the k that maximises tokens per cost, capped by Hugging Face's assisted-generation
heuristic (two longer after a draft accepted whole, one longer than what was accepted otherwise) and by n_max.
Where no k pays (or acceptance is below accept_min), the sequence stops drafting for a while, twice as long
each time it fails again, then tries one short draft (a probe) to judge again. A new sequence starts from the
server's recent acceptance where there is one (Speculator): with a draft that is never accepted, new requests
pause first instead of each learning it anew. Pure arithmetic: tested by counts.
"""

from __future__ import annotations

# Prior per-token acceptance of a sequence that has not drafted yet, and the weight of each judged position.
ALPHA_PRIOR = 0.8
ALPHA_WEIGHT = 0.1
# Positions judged before the acceptance may turn drafting off.
JUDGE_AFTER = 16
# Steps a sequence stays without drafts the first time; doubled at every new failure.
PAUSE_STEPS = 16
PAUSE_STEPS_MAX = 512


def expected_tokens(alpha: float, k: int) -> float:
    """Tokens one step yields with a draft of k tokens accepted with probability alpha each (the target's own
    token included)."""
    if alpha >= 1.0:
        return float(k + 1)
    return (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


def best_length(alpha: float, r: float, k_max: int) -> int:
    """The draft length with the most tokens per unit of step cost (0: drafting does not pay)."""
    best_k, best = 0, 1.0
    for k in range(1, k_max + 1):
        value = expected_tokens(alpha, k) / (1.0 + r * k)
        if value > best * 1.02:  # 2%: a draft that barely pays is noise, not a gain
            best_k, best = k, value
    return best_k


def extra_token_cost(r_one: float, n_seqs: int) -> float:
    """`r` for a step of n_seqs decoding sequences, from r_one measured with one: the fixed part of a step's
    cost is shared by more sequences, so one more token weighs more against each one's share."""
    b = r_one * max(1, n_seqs)
    return b / ((1.0 - r_one) + b)


class DraftLength:
    """One sequence's next draft length and its acceptance record."""

    __slots__ = ("_judged", "_pause", "_pause_next", "_probe", "accept_min", "alpha", "k", "n_max", "n_min")

    def __init__(self, n_min: int, n_max: int, accept_min: float, *, alpha: float = ALPHA_PRIOR,
                 judged: int = 0) -> None:
        self.n_min = n_min
        self.n_max = n_max
        self.accept_min = accept_min
        # The heuristic's cap starts halfway: a draft model's first draft of a new sequence costs one draft
        # decode per token before anything is known of its acceptance.
        self.k = max(n_min, n_max // 2)
        self.alpha = alpha
        self._judged = judged
        self._pause = 0  # steps left without drafts
        self._pause_next = PAUSE_STEPS
        self._probe = False  # the next draft is a probe after a pause

    @property
    def is_paused(self) -> bool:
        return self._pause > 0

    def want(self, r: float = 0.0) -> int:
        """Tokens to draft this step when one more token costs `r` of a one-token step (0: none). A paused
        sequence counts the step down."""
        if self._pause > 0:
            self._pause -= 1
            self._probe = self._pause == 0
            return 0
        if self._probe:
            return self.n_min
        k = min(self.k, best_length(self.alpha, r, self.n_max))
        if self._judged >= JUDGE_AFTER and (k < self.n_min or self.alpha < self.accept_min):
            self._pause_for_a_while()
            return 0
        return max(k, self.n_min)  # too little known yet: at least a short draft to learn from

    def record(self, drafted: int, accepted: int) -> None:
        """A verified draft: `accepted` of its `drafted` tokens matched the target."""
        if drafted <= 0:
            return
        self.k = min(self.n_max, self.k + 2) if accepted == drafted else max(self.n_min, accepted + 1)
        for _ in range(accepted):
            self.alpha += ALPHA_WEIGHT * (1.0 - self.alpha)
        if accepted < drafted:  # the first rejected position; the ones after it were never judged
            self.alpha -= ALPHA_WEIGHT * self.alpha
        self._judged += accepted + (accepted < drafted)
        if self._probe:
            self._probe = False
            if accepted == drafted:
                self._pause_next = PAUSE_STEPS  # it pays again: a later failure pauses it briefly
        if self._judged >= JUDGE_AFTER and self.alpha < self.accept_min:
            self._pause_for_a_while()

    def _pause_for_a_while(self) -> None:
        self._pause = self._pause_next
        self._pause_next = min(PAUSE_STEPS_MAX, self._pause_next * 2)
        self.k = self.n_min
