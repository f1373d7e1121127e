"""Incremental detokenization that never splits a UTF-8 character across two deltas."""

from __future__ import annotations

from collections.abc import Callable


def complete_utf8_len(buf: bytes | bytearray) -> int:
    """Length of the longest prefix of `buf` that does not end inside a multi-byte UTF-8 character."""
    n = len(buf)
    for back in range(1, min(4, n) + 1):
        byte = buf[n - back]
        if byte & 0xC0 == 0x80:  # continuation byte: keep looking for the lead byte
            continue
        if byte < 0x80:
            need = 1
        elif byte >> 5 == 0b110:
            need = 2
        elif byte >> 4 == 0b1110:
            need = 3
        elif byte >> 3 == 0b11110:
            need = 4
        else:  # not a valid lead byte: nothing to wait for
            return n
        return n if back >= need else n - back
    return n  # only stray continuation bytes: waiting would not complete them


class IncrementalDetokenizer:
    """Turns token ids into text deltas; bytes of a character split across tokens wait for the rest."""

    __slots__ = ("_pending", "_piece")

    def __init__(self, piece: Callable[[int], bytes]) -> None:
        self._piece = piece
        self._pending = b""

    def push(self, token: int) -> str:
        data = self._piece(token)
        if not self._pending and data.isascii():
            return data.decode("ascii")
        data = self._pending + data
        cut = complete_utf8_len(data)
        self._pending = data[cut:]
        return data[:cut].decode("utf-8", errors="replace")

    def flush(self) -> str:
        """What is left at the end (an incomplete character becomes U+FFFD)."""
        data, self._pending = self._pending, b""
        return data.decode("utf-8", errors="replace")
