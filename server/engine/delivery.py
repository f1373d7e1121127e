"""Hands the decode thread's events to the asyncio event loops that wait for them, from a thread of its own.

Waking an event loop (call_soon_threadsafe writes to its self-pipe) gives the GIL to the loop thread, and the
waker then waits for it back. Done on the decode thread, that wait lands between two engine steps; done here,
it overlaps the next llama_decode, which runs without the GIL.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from typing import Any

from server.engine.sequence import Sequence

log = logging.getLogger(__name__)

Item = tuple[Sequence, Any]  # an event (StreamEvent) or an exception to raise in the consumer


def _deliver(items: list[Item]) -> None:
    for seq, item in items:
        if seq.sink is not None:
            seq.sink.put(seq, item)


class EventPump:
    """A daemon thread that moves batches of (sequence, event) to their loops, one wake-up per loop per batch.

    `on_orphan(seq)` is called for sequences whose event loop is closed (nobody can listen any more).
    """

    def __init__(self, on_orphan: Callable[[Sequence], None]) -> None:
        self._on_orphan = on_orphan
        self._cond = threading.Condition()
        self._pending: list[list[Item]] = []
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="edgeserve-engine-events", daemon=True)
        self._thread.start()

    def put(self, items: list[Item]) -> None:
        with self._cond:
            self._pending.append(items)
            self._cond.notify()

    def stop(self) -> None:
        """Deliver what is queued, then end the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._stopping:
                    self._cond.wait()
                batches, self._pending = self._pending, []
                if not batches and self._stopping:
                    return
            by_loop: dict[asyncio.AbstractEventLoop, list[Item]] = {}
            for items in batches:
                for seq, item in items:
                    if seq.sink is not None:
                        by_loop.setdefault(seq.sink.loop, []).append((seq, item))
            for loop, items in by_loop.items():
                try:
                    loop.call_soon_threadsafe(_deliver, items)
                except RuntimeError:  # the loop is closed
                    for seq, _ in items:
                        self._on_orphan(seq)
                except Exception:
                    log.exception("delivering engine events failed")
