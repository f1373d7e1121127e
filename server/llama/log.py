"""Capture llama.cpp's log (llama_log_set) while edgeserve drives it, then give the previous callback back.

llama.cpp reports quantization progress and the reason of a failure only through its log, in fragments: a
tensor line is written in two calls ("[  3/ 21] name - [...], type = f16, " then "converting to q8_0 .. size =
..."), and GGML_LOG_LEVEL_CONT continues the previous level. This module joins fragments into lines.
"""

from __future__ import annotations

import contextlib
import ctypes
from collections import deque
from collections.abc import Callable, Iterator

import llama_cpp

# ggml_log_level (ggml/include/ggml.h): NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5
LOG_LEVEL_ERROR = 4
LOG_LEVEL_CONT = 5


class LogCapture:
    """Lines llama.cpp logged (the last `keep`), plus the fragment of the line being written."""

    def __init__(
        self,
        on_line: Callable[[int, str], None] | None = None,
        on_fragment: Callable[[str], None] | None = None,
        keep: int = 400,
    ) -> None:
        self.lines: deque[tuple[int, str]] = deque(maxlen=keep)
        self.partial = ""
        self._level = 2
        self._on_line = on_line
        self._on_fragment = on_fragment

    def feed(self, level: int, text: str) -> None:
        if level != LOG_LEVEL_CONT:
            self._level = level
        self.partial += text
        while "\n" in self.partial:
            line, self.partial = self.partial.split("\n", 1)
            self.lines.append((self._level, line))
            if self._on_line is not None:
                self._on_line(self._level, line)
        if self.partial and self._on_fragment is not None:
            self._on_fragment(self.partial)

    def errors(self) -> list[str]:
        return [line.strip() for level, line in self.lines if level == LOG_LEVEL_ERROR and line.strip()]

    def tail(self, n: int = 10) -> list[str]:
        return [line for _, line in list(self.lines)[-n:] if line.strip()]

    def last_error(self) -> str | None:
        """The most telling error line: llama.cpp's 'failed to ...: reason' if present."""
        errors = self.errors()
        for line in reversed(errors):
            if "failed to" in line or "error" in line.lower():
                return line
        return errors[-1] if errors else None


@contextlib.contextmanager
def captured_llama_log(
    on_line: Callable[[int, str], None] | None = None,
    on_fragment: Callable[[str], None] | None = None,
) -> Iterator[LogCapture]:
    """Route llama.cpp's log into a LogCapture for the duration of the block (nothing reaches stderr)."""
    capture = LogCapture(on_line, on_fragment)

    def _callback(level: int, text: bytes | None, _user_data: ctypes.c_void_p) -> None:
        if text:
            capture.feed(level, text.decode("utf-8", errors="replace"))

    c_callback = llama_cpp.llama_log_callback(_callback)
    prev_cb = llama_cpp.llama_log_callback()
    prev_ud = ctypes.c_void_p()
    llama_cpp.llama_log_get(ctypes.byref(prev_cb), ctypes.byref(prev_ud))
    llama_cpp.llama_log_set(c_callback, ctypes.c_void_p(0))
    try:
        yield capture
    finally:
        has_previous = ctypes.cast(prev_cb, ctypes.c_void_p).value is not None
        llama_cpp.llama_log_set(prev_cb if has_previous else None, prev_ud)
        # keep the C callback object alive until llama.cpp no longer points at it
        del c_callback
