"""The front's live link to its engine core: the core started (and started again should it die), its messages
read on the event loop that uses the engine and handed to the requests they are for, messages sent to it.

The link reads the core where the requests wait for their events: on one asyncio loop at a time, attached by
the first request (or by `attach`), so no thread stands between the pipe and the loop. A core that dies fails
the requests in flight with an EngineError and is started again, off the loop; after MAX_RESTARTS deaths in
RESTART_WINDOW_S the link gives up and says so (`give_up`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from server.engine.config import EngineConfig
from server.engine.core_client import CoreClient, CoreGoneError
from server.engine.errors import EngineError, EngineNotReadyError, ModelLoadError
from server.engine.output import FrontRequest
from server.engine.protocol import (
    AbortRequests,
    AddRequest,
    ChoiceFailed,
    CoreFailed,
    CoreInfo,
    EmbedRequest,
    EmbedResult,
    StatsUpdate,
    StepOutputs,
    ToFront,
)
from server.engine.stats import EngineStats

log = logging.getLogger(__name__)

StepObserver = Any  # Callable[[int, int], None]: (tokens in the step, sequences in it)
ToCoreMessage = AddRequest | AbortRequests | EmbedRequest

# A core that dies this many times within RESTART_WINDOW_S is not started again.
MAX_RESTARTS = 5
RESTART_WINDOW_S = 60.0


class CoreLink:
    """One engine core as the front sees it: `start`, `send`, the requests and embeddings waiting on it."""

    def __init__(self, config: EngineConfig, give_up: Callable[[ModelLoadError], None]) -> None:
        self.config = config
        self.on_step: StepObserver | None = None
        self.give_up = give_up
        self.client: CoreClient | None = None
        self.info: CoreInfo | None = None
        self.stats: EngineStats | None = None
        self.requests: dict[int, FrontRequest] = {}
        self.embeds: dict[int, asyncio.Future[EmbedResult]] = {}
        self.ready = threading.Event()
        self.stopping = False
        self.front_seconds = {"front_read": 0.0, "front_text": 0.0}
        self._outbox: list[ToCoreMessage] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._deaths: list[float] = []

    def start(self) -> CoreInfo:
        """Start the core and wait until it has loaded (ModelLoadError / DoesNotFitError otherwise)."""
        client = CoreClient(self.config, self.config.core)
        client.start()
        try:
            ready = client.wait_ready()
        except BaseException:
            client.stop()
            raise
        self.client = client
        self.stats = ready.stats
        self.info = ready.info
        self.ready.set()
        return ready.info

    def is_alive(self) -> bool:
        client = self.client
        return self.ready.is_set() and client is not None and client.is_alive()

    def stop(self, error: EngineError) -> None:
        """Fail what waits with `error`, stop reading, stop the core."""
        self.stopping = True
        self.ready.clear()
        self.fail_open(error)
        self.detach()
        if self.client is not None:
            self.client.stop()
            self.client = None

    def poll(self) -> None:
        """Take in what the core sent, where no event loop reads it now."""
        loop = self._loop
        if loop is None or loop.is_closed() or not loop.is_running():
            self._on_readable()

    def fail_open(self, error: EngineError) -> None:
        requests, self.requests = self.requests, {}
        embeds, self.embeds = self.embeds, {}
        loop = self._loop

        def fail() -> None:
            for req in requests.values():
                req.fail(None, error)
            for future in embeds.values():
                if not future.done():
                    future.set_exception(error)

        if loop is None or loop.is_closed():
            return
        if on_loop(loop):
            fail()
        else:
            loop.call_soon_threadsafe(fail)

    # --- the event loop that reads the core -----------------------------------------------------------------

    def attach(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Read the core on `loop` (default: the running one) from now on, so its death is seen while idle.
        Requests attach their loop themselves; one loop at a time."""
        loop = loop or asyncio.get_running_loop()
        if loop is self._loop or self.client is None:
            return
        old = self._loop
        if old is not None and not old.is_closed():
            if old.is_running() and not on_loop(old):
                raise RuntimeError("the engine is in use by another event loop")
            old.remove_reader(self.client.fileno())
        self._loop = loop
        loop.add_reader(self.client.fileno(), self._on_readable)

    def detach(self) -> None:
        loop, self._loop = self._loop, None
        if loop is None or loop.is_closed() or self.client is None:
            return
        fd = self.client.fileno()
        if on_loop(loop):
            loop.remove_reader(fd)
        else:
            done = threading.Event()

            def remove() -> None:
                loop.remove_reader(fd)
                done.set()

            loop.call_soon_threadsafe(remove)
            done.wait(5.0)

    def _on_readable(self) -> None:
        client = self.client
        if client is None:
            return
        started = time.perf_counter()
        try:
            messages = client.read_ready()
        except EOFError:
            self._on_core_exit(client)
            return
        read = time.perf_counter()
        for msg in messages:
            self._on_message(msg)
        # The front's share of a step: reading the core's messages, and turning its tokens into text.
        self.front_seconds["front_read"] += read - started
        self.front_seconds["front_text"] += time.perf_counter() - read

    def _on_message(self, msg: ToFront) -> None:
        if isinstance(msg, StepOutputs):
            if msg.stats is not None:
                self.stats = msg.stats
            if self.on_step is not None and msg.n_tokens:
                try:
                    self.on_step(msg.n_tokens, msg.n_seqs)
                except Exception:
                    log.exception("on_step observer failed")
            requests = self.requests
            for out in msg.outputs:
                req = requests.get(out.req_id)
                if req is not None and req.on_token(out):
                    self.send_abort(AbortRequests(out.req_id, (out.choice,), finished=True))
        elif isinstance(msg, StatsUpdate):
            self.stats = msg.stats
        elif isinstance(msg, EmbedResult):
            future = self.embeds.pop(msg.req_id, None)
            if future is not None and not future.done():
                future.set_result(msg)
        elif isinstance(msg, ChoiceFailed):
            req = self.requests.get(msg.req_id)
            if req is not None:
                req.fail(msg.choice, EngineError(msg.message))
        elif isinstance(msg, CoreFailed):
            log.error("the engine core failed: %s", msg.message)

    def _on_core_exit(self, client: CoreClient) -> None:
        """The core's pipe closed: fail what was in flight and (unless stopping) start a new core."""
        loop = self._loop
        self.ready.clear()
        if self.stopping:
            self.detach()
            return
        why = client.exit_description()
        log.error("the engine core died (%s): failing %d requests in flight and starting it again", why,
                  len(self.requests))
        self.fail_open(EngineError(f"the engine core died ({why}); it is being started again"))
        self.detach()
        client.stop(timeout_s=1.0)
        now = time.monotonic()
        self._deaths = [t for t in self._deaths if now - t < RESTART_WINDOW_S] + [now]
        if len(self._deaths) > MAX_RESTARTS:
            self.give_up(ModelLoadError(f"the engine core died {len(self._deaths)} times within "
                                         f"{RESTART_WINDOW_S:.0f} s; not starting it again"))
            return
        if loop is not None:
            loop.run_in_executor(None, self._restart, loop)

    def _restart(self, loop: asyncio.AbstractEventLoop) -> None:
        delay = 0.25 * 2 ** (len(self._deaths) - 1)
        time.sleep(min(delay, 4.0))
        try:
            self.start()
        except BaseException as exc:
            error = exc if isinstance(exc, ModelLoadError) else ModelLoadError(str(exc))
            log.error("the engine core could not be started again: %s", exc)
            if not loop.is_closed():
                loop.call_soon_threadsafe(self.give_up, error)
            return
        log.info("the engine core is back (pid %s)", self.client.pid if self.client else None)
        if not loop.is_closed():
            loop.call_soon_threadsafe(self.attach, loop)

    def send(self, msg: AddRequest | AbortRequests | EmbedRequest) -> None:
        """To the core. On the loop that reads the core, messages of one loop iteration go out together,
        so requests that arrive together are scheduled together (and one write carries them)."""
        client = self.client
        if client is None:
            raise EngineNotReadyError("the engine is not running")
        loop = self._loop
        if loop is not None and on_loop(loop):
            self._outbox.append(msg)
            if len(self._outbox) == 1:
                loop.call_soon(self._flush)
            return
        try:
            client.send(msg)
        except CoreGoneError as exc:
            raise EngineNotReadyError(str(exc)) from None

    def _flush(self) -> None:
        messages, self._outbox = self._outbox, []
        client = self.client
        if not messages or client is None:
            return
        try:
            client.send(tuple(messages))
        except CoreGoneError as exc:
            # The reader sees the end of the core's pipe too and fails every request in flight.
            log.warning("%s: %d messages not sent", exc, len(messages))

    def send_abort(self, msg: AbortRequests) -> None:
        with contextlib.suppress(EngineNotReadyError):  # the core is gone: nothing runs there to abort
            self.send(msg)



def on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    """Whether this code runs on `loop` now."""
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False
