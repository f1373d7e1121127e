"""One request's speculative-decoding state, as the request carries it: its draft length and, for prompt
lookup, its n-gram index."""

from __future__ import annotations

from server.engine.spec.draft_length import DraftLength
from server.engine.spec.ngram import NgramIndex


class SpecSeq:
    """A drafting request's state (Request.spec); None there means the request does not draft."""

    __slots__ = ("index", "length")

    def __init__(self, length: DraftLength, index: NgramIndex | None) -> None:
        self.length = length
        self.index = index
