"""A job's deltas after the first, read ahead by one task into a queue: the stream writer waits on one queue
per delta, and the job's deadline and the server's end reach it as items in that queue.

Racing every delta against the deadline and the shutdown (two new tasks and an asyncio.wait per token) cost
more than the rest of the proxy path together; here a token costs one queue put and one get. Deltas that
arrive while the writer is busy wait in the queue and go out together (`ready`).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import AsyncIterator

from server.gateway.backends.base import Delta

log = logging.getLogger(__name__)


class _Mark(enum.Enum):
    END = "end"  # the backend's stream ended
    TIMEOUT = "timeout"  # the job's deadline passed
    ENDING = "ending"  # the server's grace period is over


class FeedTimeoutError(Exception):
    """The job ran past its deadline."""


class FeedEndingError(Exception):
    """The server's shutdown grace period is over: the job ends now."""


class DeltaFeed:
    """Pumps `iterator` into a queue until it ends, fails or `close()`; `next()` takes one delta at a time."""

    def __init__(self, iterator: AsyncIterator[Delta], deadline: float, ending: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        self._iterator = iterator
        self._queue: asyncio.Queue[Delta | _Mark | BaseException] = asyncio.Queue()
        self._held: Delta | _Mark | BaseException | None = None  # taken by ready(), due at the next next()
        self._pump = loop.create_task(self._run())
        self._timer = loop.call_later(max(0.0, deadline - time.monotonic()), self._queue.put_nowait,
                                      _Mark.TIMEOUT)
        self._ending = loop.create_task(self._watch(ending))

    async def _run(self) -> None:
        try:
            async for delta in self._iterator:
                self._queue.put_nowait(delta)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # the writer raises it where it takes it
            self._queue.put_nowait(exc)
        else:
            self._queue.put_nowait(_Mark.END)

    async def _watch(self, ending: asyncio.Event) -> None:
        await ending.wait()
        self._queue.put_nowait(_Mark.ENDING)

    def _unpack(self, item: Delta | _Mark | BaseException) -> Delta | None:
        if isinstance(item, Delta):
            return item
        if item is _Mark.END:
            self._queue.put_nowait(item)  # a later next() sees the end too
            return None
        if item is _Mark.TIMEOUT:
            raise FeedTimeoutError
        if item is _Mark.ENDING:
            raise FeedEndingError
        assert isinstance(item, BaseException)
        raise item

    async def next(self) -> Delta | None:
        """The next delta; None at the end. Raises the backend's error, FeedTimeoutError, FeedEndingError."""
        held, self._held = self._held, None
        return self._unpack(held if held is not None else await self._queue.get())

    def ready(self) -> list[Delta]:
        """Deltas that have arrived and wait, taken without waiting (stops at an end or an error, which the
        next `next()` reports)."""
        out: list[Delta] = []
        queue = self._queue
        while self._held is None and not queue.empty():
            item = queue.get_nowait()
            if isinstance(item, Delta):
                out.append(item)
            else:
                self._held = item
        return out

    async def close(self) -> None:
        """Stop reading: the backend's stream is closed (its request cancelled), the timers cleared."""
        self._timer.cancel()
        self._ending.cancel()
        self._pump.cancel()
        with contextlib.suppress(BaseException):
            await self._pump
        aclose = getattr(self._iterator, "aclose", None)
        if aclose is not None:
            try:
                await aclose()
            except Exception:
                log.debug("closing the backend stream failed", exc_info=True)
