"""Prompt lookup (llama-server's ngram-simple, vLLM's `[ngram]`): a draft is what followed the newest earlier
occurrence of the sequence's last n tokens, in its prompt or in the text it has generated so far.

Free to compute and strong wherever the answer repeats its input: editing, quoting, code, RAG answers. The
index is built incrementally (each step adds the n-grams of the tokens that arrived), so a lookup costs one
dict probe per n-gram length, whatever the sequence's length.
"""

from __future__ import annotations

from collections.abc import Sequence

# Shorter n-grams than this match too much to be worth a draft.
MIN_NGRAM = 2


class NgramIndex:
    """For one sequence: n-gram -> the position right after its newest occurrence, for n from `size_n` down to
    MIN_NGRAM (or `size_n` alone where it is smaller)."""

    __slots__ = ("_indexed", "_maps", "_sizes")

    def __init__(self, size_n: int) -> None:
        self._sizes = tuple(range(size_n, min(size_n, MIN_NGRAM) - 1, -1))
        self._maps: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in self._sizes}
        self._indexed = 0  # n-grams ending before this position are in the maps

    def _update(self, tokens: Sequence[int]) -> None:
        # Index n-grams ending at positions < len(tokens) - 1: the last one is the key being looked up, and an
        # n-gram is only worth something with at least one token after it.
        end = len(tokens) - 1
        for n, table in self._maps.items():
            for stop in range(max(self._indexed, n), end + 1):
                table[tuple(tokens[stop - n: stop])] = stop
        self._indexed = max(self._indexed, end + 1)

    def propose(self, tokens: Sequence[int], k: int) -> tuple[int, ...]:
        """Up to `k` tokens that followed the newest earlier occurrence of the longest n-gram that ends
        `tokens`; empty when none occurred before."""
        if k <= 0:
            return ()
        self._update(tokens)
        length = len(tokens)
        for n, table in self._maps.items():
            if length <= n:
                continue
            start = table.get(tuple(tokens[length - n:]))
            if start is not None and start < length:
                return tuple(tokens[start: min(start + k, length)])
        return ()
