"""The engine core's process (or, for tests, thread): load the model, then serve one front over two pipes.

    python -m server.engine.core_proc --config JSON --in-fd N --out-fd M

A reader thread takes the front's messages off the pipe into the core's inbox; a writer thread pickles the
core's messages onto the other pipe; the core's loop (core.py) runs on the main thread and never waits on
either. Embeddings run on a thread of their own, with a llama.cpp context of their own. End of the input pipe
(the front died or closed it) means shutdown: a core never outlives its front.
"""

from __future__ import annotations

import argparse
import logging
import os
import pickle
import queue
import sys
import threading
from multiprocessing.connection import Connection
from typing import Literal

from server.engine.config import EngineConfig
from server.engine.core import EngineCore
from server.engine.embedder import Embedder
from server.engine.errors import DoesNotFitError, EngineError, ModelLoadError
from server.engine.llama_context import LlamaRuntime
from server.engine.preflight import check_memory, gpu_offload_wanted, warn_if_gpu_unused
from server.engine.protocol import (
    CoreFailed,
    CoreInfo,
    CoreReady,
    EmbedRequest,
    EmbedResult,
    Shutdown,
    ToFront,
)
from server.engine.spec.draft_model import DraftModel

log = logging.getLogger(__name__)

PICKLE_PROTOCOL = 5


class Writer:
    """A thread that pickles messages onto the pipe, in order; `close` sends what is queued, then stops."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._queue: queue.SimpleQueue[ToFront | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="edgeserve-core-writer", daemon=True)
        self._thread.start()

    def put(self, msg: ToFront) -> None:
        self._queue.put(msg)

    def _run(self) -> None:
        while True:
            msg = self._queue.get()
            if msg is None:
                return
            try:
                self._conn.send_bytes(pickle.dumps(msg, protocol=PICKLE_PROTOCOL))
            except (BrokenPipeError, OSError):
                return  # the front is gone; the reader sees the end of its pipe too

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()


class EmbedWorker:
    """Embeddings on a thread and a llama.cpp context of their own: /v1/embeddings never holds up a step."""

    def __init__(self, embedder: Embedder, send: Writer) -> None:
        self._embedder = embedder
        self._send = send
        self._queue: queue.SimpleQueue[EmbedRequest | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="edgeserve-core-embed", daemon=True)
        self._thread.start()

    def put(self, msg: EmbedRequest) -> None:
        self._queue.put(msg)

    def _run(self) -> None:
        while (msg := self._queue.get()) is not None:
            try:
                result = self._embedder.embed(msg.inputs)
                self._send.put(EmbedResult(msg.req_id, result.vectors, result.prompt_tokens))
            except (EngineError, ValueError) as exc:
                self._send.put(EmbedResult(msg.req_id, error=str(exc)))

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        self._embedder.close()


def _load(config: EngineConfig) -> tuple[LlamaRuntime, DraftModel | None]:
    if not config.force:
        check_memory(config, config.model_file(), on_gpu=gpu_offload_wanted(config))
    runtime = LlamaRuntime(config)
    if config.spec_type != "draft-simple":
        return runtime, None
    try:
        return runtime, DraftModel(config, runtime)
    except BaseException:
        runtime.close()
        raise


def serve(config: EngineConfig, conn_in: Connection, conn_out: Connection) -> int:
    """Load, announce, run until Shutdown or the end of the input pipe. Returns the exit status (0 after a
    Shutdown, 3 when the model could not load, 1 when the loop died)."""
    writer = Writer(conn_out)
    try:
        runtime, drafter = _load(config)
    except BaseException as exc:
        kind: Literal["load", "does_not_fit"] = "does_not_fit" if isinstance(exc, DoesNotFitError) else "load"
        message = str(exc) if isinstance(exc, ModelLoadError) else f"{type(exc).__name__}: {exc}"
        log.error("model load failed: %s", message)
        writer.put(CoreFailed(kind, message))
        writer.close()
        return 3
    embed = EmbedWorker(Embedder(runtime.model, config, runtime.n_vocab), writer) \
        if config.pooling != "none" else None
    core = EngineCore(runtime, config, writer.put, on_embed=embed.put if embed is not None else None,
                      drafter=drafter)
    info = CoreInfo(pid=os.getpid(), n_ctx=runtime.n_ctx, n_slots=runtime.n_seq_max,
                    kv_cells=runtime.kv_cells, n_vocab=runtime.n_vocab, placement=runtime.placement)
    log.info("engine core ready: %s on %s, %d slots, %d KV cells, %d tokens per sequence",
             config.model_file().name, runtime.placement.describe(), runtime.n_seq_max, runtime.kv_cells,
             runtime.n_ctx)
    warn_if_gpu_unused(runtime.placement, config)
    writer.put(CoreReady(info, core.stats()))
    reader = threading.Thread(target=_read, args=(conn_in, core), name="edgeserve-core-reader", daemon=True)
    reader.start()
    status = 0
    try:
        core.run()
        core.fail_all("the engine was stopped")
    except BaseException as exc:  # a bug or a fatal llama.cpp error: say so, fail every request, exit
        log.exception("engine core loop died")
        core.fail_all(f"the engine's decode loop failed: {exc}")
        writer.put(CoreFailed("loop", f"the engine's decode loop failed: {exc}"))
        status = 1
    finally:
        if embed is not None:
            embed.close()
        runtime.close()
        writer.close()
    return status


def _read(conn: Connection, core: EngineCore) -> None:
    while True:
        try:
            msg = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):
            core.post(Shutdown())
            return
        batch = msg if isinstance(msg, tuple) else (msg,)
        core.post(*batch)
        if any(isinstance(m, Shutdown) for m in batch):
            return


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="edgeserve's engine core (started by the engine's front)")
    parser.add_argument("--config", required=True, help="EngineConfig as JSON")
    parser.add_argument("--in-fd", type=int, required=True)
    parser.add_argument("--out-fd", type=int, required=True)
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s edgeserve-core %(name)s: %(message)s")
    config = EngineConfig.model_validate_json(args.config)
    conn_in = Connection(args.in_fd, writable=False)
    conn_out = Connection(args.out_fd, readable=False)
    return serve(config, conn_in, conn_out)


if __name__ == "__main__":
    sys.exit(main())
