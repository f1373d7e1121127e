"""Speculative decoding's side of the engine core: which requests draft, their drafts for the next step, and
what the verification of those drafts did.

The scheduler asks for the drafts of the step's decoding sequences (`drafts`); the runner feeds each
sequence's last token and its draft in the same llama_decode as every other sequence's tokens, and samples
the rows in order with the request's own sampler until a sampled token differs from the draft (runner.py);
the core hands the outcome back here (`record`) and removes the rejected tokens' KV cells.

Why sampling keeps the target's distribution: every draft here is a deterministic function of the tokens so
far (prompt lookup, or a draft model decoding greedily), so the draft distribution q is a point mass and the
rejection rule of speculative sampling, accept x with min(1, p(x)/q(x)) else sample norm(max(0, p - q)),
becomes: accept x with probability p(x), else sample from p without x, renormalised. Sampling one token from
p with the request's chain and comparing it with x does exactly that, and every emitted token is one draw of
the chain, as without speculation (grammar, penalties, logprobs and the seed's stream included).

A sequence drafts as many tokens as pay for their verification, given its own acceptance and what one more
token costs in a step of this many sequences (draft_length.py): none where nothing pays, so speculation
turns itself off as the batch grows or acceptance falls; above `spec_seq_limit` decoding sequences no
sequence drafts at all.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from server.engine.spec.draft_length import ALPHA_PRIOR, JUDGE_AFTER, DraftLength, extra_token_cost
from server.engine.spec.ngram import NgramIndex
from server.engine.spec.seq_state import SpecSeq

if TYPE_CHECKING:
    from server.engine.config import EngineConfig
    from server.engine.request import Request


# Weight of one judged position in the server's acceptance (slower than a sequence's own).
SERVER_ALPHA_WEIGHT = 0.05


class Drafter(Protocol):
    """Proposes drafts for several sequences at once (a draft model decodes them in one batch)."""

    def propose(self, reqs: Sequence[Request], lengths: Sequence[int]) -> list[tuple[int, ...]]: ...

    def forget(self, req: Request) -> None: ...

    def close(self) -> None: ...


class NgramDrafter:
    """Prompt lookup over each request's own tokens."""

    def propose(self, reqs: Sequence[Request], lengths: Sequence[int]) -> list[tuple[int, ...]]:
        out: list[tuple[int, ...]] = []
        for req, k in zip(reqs, lengths, strict=True):
            spec = req.spec
            out.append(spec.index.propose(req.tokens, k) if spec is not None and spec.index is not None
                       else ())
        return out

    def forget(self, req: Request) -> None:
        del req

    def close(self) -> None:
        pass


class Speculator:
    """Drafts for the engine core's decoding sequences, and the counters of what came of them."""

    def __init__(self, config: EngineConfig, *, output_on_gpu: bool, drafter: Drafter | None = None) -> None:
        self.config = config
        self.seq_limit = config.spec_seq_limit(output_on_gpu)
        self.token_cost = config.spec_token_cost_on(output_on_gpu)
        self.drafter: Drafter = drafter if drafter is not None else NgramDrafter()
        self.drafted_total = 0
        self.accepted_total = 0
        self.verified_total = 0  # sequence-steps that verified a draft
        self.skipped_steps_total = 0  # steps with drafting sequences where the batch was too large to draft
        # The server's recent per-token acceptance (over every sequence), where new sequences start from.
        self.alpha = ALPHA_PRIOR
        self._judged = 0

    def attach(self, req: Request) -> None:
        """Give `req` speculation state if it speculates (the server's default unless it turned it off)."""
        if req.params.speculative is False or not self.config.speculates:
            return
        c = self.config
        index = NgramIndex(c.spec_ngram_simple_size_n) if c.spec_type == "ngram-simple" else None
        known = self._judged >= JUDGE_AFTER
        length = DraftLength(c.spec_draft_n_min, c.spec_draft_n_max, c.spec_accept_min,
                             alpha=self.alpha if known else ALPHA_PRIOR, judged=JUDGE_AFTER if known else 0)
        req.spec = SpecSeq(length, index)

    def detach(self, req: Request) -> None:
        if req.spec is not None:
            self.drafter.forget(req)

    def drafts(self, decoders: Sequence[Request], room: int) -> list[tuple[int, ...]]:
        """A draft per decoding sequence (empty for most), within `room` tokens of the step in all."""
        none: list[tuple[int, ...]] = [()] * len(decoders)
        spec_reqs = [i for i, r in enumerate(decoders) if r.spec is not None]
        if not spec_reqs or room <= 0:
            return none
        if len(decoders) > self.seq_limit:
            self.skipped_steps_total += 1
            return none
        n_min = self.config.spec_draft_n_min
        r = extra_token_cost(self.token_cost, len(decoders))
        asked: list[int] = []
        lengths: list[int] = []
        for i in spec_reqs:
            req = decoders[i]
            assert req.spec is not None
            # Never past max_tokens: the bonus token after a fully accepted draft counts too.
            k = min(req.spec.length.want(r), req.params.max_tokens - req.n_generated - 1, room)
            if k >= n_min:
                asked.append(i)
                lengths.append(k)
                room -= k
        if not asked:
            return none
        proposed = self.drafter.propose([decoders[i] for i in asked], lengths)
        for i, draft in zip(asked, proposed, strict=True):
            if len(draft) >= n_min:
                none[i] = draft
        return none

    def record(self, req: Request, drafted: int, accepted: int) -> None:
        """The verification of `req`'s draft of `drafted` tokens accepted `accepted`."""
        self.drafted_total += drafted
        self.accepted_total += accepted
        self.verified_total += 1
        for _ in range(accepted):
            self.alpha += SERVER_ALPHA_WEIGHT * (1.0 - self.alpha)
        if accepted < drafted:
            self.alpha -= SERVER_ALPHA_WEIGHT * self.alpha
        self._judged += accepted + (accepted < drafted)
        if req.spec is not None:
            req.spec.length.record(drafted, accepted)

    def close(self) -> None:
        self.drafter.close()
