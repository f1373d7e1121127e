"""Stopping the gateway without cutting anyone off, and exiting when it can no longer serve.

On the first SIGTERM or SIGINT: the listener closes, new requests get 503 with Retry-After, requests in flight
run on for `shutdown_grace_s`; then every stream still open ends with an OpenAI-shaped error event and
`data: [DONE]` (a non-streamed request gets a 503 with Retry-After), and the backend stops. uvicorn itself
would wait for connections forever, or cut them after its own timeout: here its timeout comes only after the
streams were ended properly. A drained stop is a clean exit (status 0); a second Ctrl-C cuts the drain short
and leaves as an interrupt. When the backend fails to load for good, the server exits (non-zero, with the
reason) instead of answering 503 forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import signal
import threading
from collections.abc import Iterator
from types import FrameType

import uvicorn
from uvicorn.server import HANDLED_SIGNALS

from server.gateway.state import GatewayState

log = logging.getLogger(__name__)

# After the grace period the streams end at once; this is the margin for their last bytes.
CLOSE_MARGIN_S = 5.0


class DrainingServer(uvicorn.Server):
    """uvicorn's server with edgeserve's drain on signals and exit on a fatal load failure."""

    def __init__(self, config: uvicorn.Config, state: GatewayState) -> None:
        super().__init__(config)
        self.state = state
        self.fatal: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        state.on_fatal = self._on_fatal

    async def serve(self, sockets: list | None = None) -> None:  # type: ignore[type-arg]
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def _on_fatal(self, reason: str) -> None:
        self.fatal = reason
        self.should_exit = True

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._loop is not None and not self.state.draining:
            self._loop.call_soon_threadsafe(self.state.begin_drain, self.state.settings.shutdown_grace_s)
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """uvicorn's signal capture, less its last step: uvicorn raises the caught signal again once it has
        stopped, so a drained SIGTERM would end the process by that signal (status -15) and a wrapper that
        checks for 0 would see a failure. The stop was asked for and done: the process returns normally."""
        if threading.current_thread() is not threading.main_thread():
            yield  # signals reach the main thread only; whoever runs this thread handles them
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in HANDLED_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if self.force_exit:
            signal.raise_signal(signal.SIGINT)  # a second Ctrl-C cut the drain short: not a clean stop


def run(app: object, state: GatewayState, *, host: str, port: int, log_level: str) -> str | None:
    """Serve `app` until a signal (drained) or a fatal load failure; returns that failure's reason."""
    close_after_s = math.ceil(state.settings.shutdown_grace_s + CLOSE_MARGIN_S)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,  # type: ignore[arg-type]
                            timeout_graceful_shutdown=close_after_s)
    server = DrainingServer(config, state)
    server.run()
    return server.fatal
