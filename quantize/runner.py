"""Run llama.cpp's own quantizer (`llama_model_quantize`) in a child process and report progress per tensor.

Why a child process: the C call cannot be interrupted from Python (Ctrl-C would wait for the whole model), and
llama.cpp aborts the process on some malformed inputs (GGML_ABORT). In a child, Ctrl-C terminates it at once
and an abort becomes an error message instead of the death of the CLI. Progress comes from llama.cpp's log:
it writes one "[ i/ n] name - [shape], type = ..." line per tensor, the only per-tensor signal it gives.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import re
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

_TENSOR_START_RE = re.compile(r"^\[\s*(\d+)/\s*(\d+)\]\s+(\S+)")
_TENSOR_HEAD_RE = re.compile(r"^\[\s*(\d+)/\s*(\d+)\]\s+(\S+)\s+-\s+\[[^\]]*\],\s+type =\s*(\w+),")
_CONVERTED_RE = re.compile(r"converting to (\w+)")
_PLANNED_RE = re.compile(r"size =.*\((\w+)\)\s*$")


class QuantizeFailedError(RuntimeError):
    """llama.cpp refused or failed to quantize; the message is its reason in one line."""


@dataclass(frozen=True)
class QuantizeJob:
    """One llama_model_quantize call. `ftype` is a LLAMA_FTYPE_MOSTLY_* value."""

    src: str
    dst: str
    ftype: int
    nthread: int = 0
    allow_requantize: bool = False
    imatrix: str | None = None
    dry_run: bool = False


@dataclass(frozen=True)
class TensorProgress:
    """A tensor llama.cpp started (is_done False) or finished (is_done True, with its types)."""

    index: int
    total: int
    name: str
    is_done: bool
    source_type: str = ""
    target_type: str = ""


@dataclass(frozen=True)
class QuantizeRun:
    """What llama.cpp did: the type it gave each tensor (ggml names upper-cased, as gguf spells them)."""

    tensor_types: dict[str, str]
    seconds: float
    log_tail: tuple[str, ...] = field(default=())


class TensorLogParser:
    """Turns llama_model_quantize's log lines into finished-tensor records.

    A record starts with "[ i/ n] name - [shape], type = f16, " and ends at "size = ..." ("converting to T"
    before it when the type changes; "(T)" after it in a dry run). llama.cpp may log other lines in between
    (an imatrix notice), which split the record over several lines.
    """

    def __init__(self) -> None:
        self._head: tuple[int, int, str, str] | None = None
        self._target: str | None = None

    def feed(self, line: str) -> TensorProgress | None:
        text = line.strip()
        m = _TENSOR_HEAD_RE.match(text)
        if m:
            self._head = (int(m.group(1)), int(m.group(2)), m.group(3), m.group(4))
            self._target = None
        if self._head is None:
            return None
        conv = _CONVERTED_RE.search(text)
        if conv:
            self._target = conv.group(1)
        if "size =" not in text:
            return None
        planned = _PLANNED_RE.search(text)
        index, total, name, cur = self._head
        target = self._target or (planned.group(1) if planned else cur)
        self._head = None
        return TensorProgress(index, total, name, True, cur.upper(), target.upper())


def parse_tensor_line(line: str) -> TensorProgress | None:
    """A complete one-line tensor record of llama_model_quantize's log (normal or dry run), or None."""
    return TensorLogParser().feed(line)


def _child_main(job: QuantizeJob, conn: Connection) -> None:
    # The parent owns Ctrl-C: it terminates this process and removes the partial output.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    started: set[int] = set()
    parser = TensorLogParser()

    def on_fragment(text: str) -> None:
        m = _TENSOR_START_RE.match(text)
        if m and int(m.group(1)) not in started:
            started.add(int(m.group(1)))
            conn.send(("tensor", TensorProgress(int(m.group(1)), int(m.group(2)), m.group(3), False)))

    def on_line(_level: int, line: str) -> None:
        progress = parser.feed(line)
        if progress is not None:
            conn.send(("tensor", progress))

    try:
        rc, error, tail = _quantize_in_child(job, on_line, on_fragment)
    except Exception as exc:  # reported to the parent as one line; a traceback here would reach the terminal
        rc, error, tail = 1, f"failed to quantize: {exc}", ()
    conn.send(("done", rc, error, tail))
    conn.close()


def _quantize_in_child(
    job: QuantizeJob, on_line: Callable[[int, str], None], on_fragment: Callable[[str], None]
) -> tuple[int, str | None, tuple[str, ...]]:
    import llama_cpp

    from server.llama.log import captured_llama_log

    keep: list[Any] = []
    with captured_llama_log(on_line, on_fragment) as capture:
        llama_cpp.llama_backend_init()
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = job.ftype
        params.nthread = job.nthread
        params.allow_requantize = job.allow_requantize
        params.dry_run = job.dry_run
        if job.imatrix:
            from quantize.imatrix import load_imatrix

            arr, keep = load_imatrix(job.imatrix).as_c_array()
            keep.append(arr)
            params.imatrix = ctypes.cast(arr, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
        rc = llama_cpp.llama_model_quantize(job.src.encode(), job.dst.encode(), ctypes.byref(params))
    return int(rc), capture.last_error(), tuple(capture.tail(20))


def run_llama_quantize(
    job: QuantizeJob, on_progress: Callable[[TensorProgress], None] | None = None
) -> QuantizeRun:
    """Quantize `job.src` into `job.dst` with llama.cpp; raise QuantizeFailedError with llama.cpp's reason.

    On any exception (KeyboardInterrupt included) the child is terminated before the exception propagates;
    removing the partial `dst` is the caller's job (it writes to a temporary path).
    """
    ctx = multiprocessing.get_context("spawn")
    receiver, sender = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child_main, args=(job, sender), daemon=True, name="edgeserve-quantize")
    t0 = time.monotonic()
    proc.start()
    sender.close()
    types: dict[str, str] = {}
    done: tuple[Any, ...] | None = None
    try:
        while done is None:
            try:
                if not receiver.poll(0.2):
                    if not proc.is_alive() and not receiver.poll(0):
                        break
                    continue
                msg = receiver.recv()
            except EOFError:
                break
            if msg[0] == "tensor":
                progress: TensorProgress = msg[1]
                if progress.is_done:
                    types[progress.name] = progress.target_type
                if on_progress is not None:
                    on_progress(progress)
            elif msg[0] == "done":
                done = msg
        proc.join(30)
    except BaseException:
        _stop(proc)
        raise
    finally:
        receiver.close()
    seconds = time.monotonic() - t0
    if done is None:
        _stop(proc)
        code = proc.exitcode
        how = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        raise QuantizeFailedError(f"llama.cpp stopped while quantizing {job.src} ({how})")
    _, rc, error, tail = done
    if rc != 0:
        reason = (error or "unknown error").split("failed to quantize:", 1)[-1].strip()
        raise QuantizeFailedError(f"llama.cpp could not quantize {job.src}: {reason}")
    return QuantizeRun(tensor_types=types, seconds=seconds, log_tail=tuple(tail))


def _stop(proc: Any) -> None:
    if proc.is_alive():
        proc.terminate()
        proc.join(5)
    if proc.is_alive():
        proc.kill()
        proc.join(5)
