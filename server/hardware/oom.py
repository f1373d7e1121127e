"""Recognise why a backend died from the tail of its log: out of memory, a load error, or some other crash.

A fact about the hardware's limits as llama.cpp, PyTorch and SGLang report them: the launcher's supervisor
(OOM ladder) and the gateway's fallback chain both read it, so it sits below both.

The patterns are the messages llama.cpp (vendored by llama-cpp-python 0.3.36), llama-cpp-python, PyTorch and
SGLang really print, with the source of each:
- ggml-cuda.cu: "<fn>: allocating X MiB on device N: cudaMalloc failed: out of memory"
  (fn = ggml_backend_cuda_buffer_type_alloc_buffer);
- ggml.c ggml_aligned_malloc: "insufficient memory (attempted to allocate X MB)" (CPU buffers);
- ggml-backend.cpp: "ggml_backend_cpu_buffer_type_alloc_buffer: failed to allocate buffer of size N";
- ggml-alloc.c: "failed to allocate <buft> buffer of size N";
- llama-kv-cache.cpp: "failed to allocate buffer for kv cache"; llama-model.cpp: "unable to allocate <buft>
  buffer"; llama-context.cpp: "failed to allocate compute pp/tg buffers";
- common.cpp / llama-cpp-python: "failed to create context with model", "Failed to create llama_context";
  edgeserve's own engine: "llama.cpp could not create a context for <model> (...)", and its check before
  allocating: "does not fit: ... <n> needed, <m> free on <device>";
- PyTorch: "CUDA out of memory. Tried to allocate X GiB"; SGLang: "Not enough memory. Please try to increase
  --mem-fraction-static" (the KV pool got no room: the fraction is too LOW, not too high).
"failed to load model" alone is also what a missing or damaged file prints, so it counts as out of memory only
next to an allocation failure; otherwise it is a load error, which no restart fixes.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from quantize.model.units import GIB, KIB, MIB

FailureKind = Literal["oom", "load_error", "crash"]
OomCause = Literal["alloc", "pool_too_small"]
Phase = Literal["startup", "running"]

# llama.cpp and PyTorch write MB/GB for binary sizes.
_UNITS = {"B": 1, "KB": KIB, "KIB": KIB, "MB": MIB, "MIB": MIB, "GB": GIB, "GIB": GIB}


class Failure(BaseModel):
    """Why a backend process ended, as far as its exit status and log tell."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: FailureKind
    phase: Phase
    exit_code: int | None = None
    cause: OomCause | None = None
    evidence: str | None = Field(default=None, description="the log line that decided the kind")
    requested_bytes: int | None = Field(
        default=None, ge=0, description="largest failed allocation in the log"
    )
    available_bytes: int | None = Field(default=None, ge=0, description="memory free/capped before the start")

    @property
    def is_oom(self) -> bool:
        return self.kind == "oom"


# (pattern, how it reports a size: group name "size" + "unit", or a fixed unit)
_ALLOC_PATTERNS: tuple[tuple[re.Pattern[str], str | None], ...] = (
    (re.compile(r"allocating (?P<size>[\d.]+) MiB on device \d+: cudaMalloc failed: out of memory"), "MIB"),
    (re.compile(r"cudaMalloc failed: out of memory"), None),
    (re.compile(r"ggml_backend_cuda_buffer_type_alloc_buffer"), None),
    (re.compile(r"insufficient memory \(attempted to allocate\s+(?P<size>[\d.]+) MB\)"), "MB"),
    (re.compile(r"failed to allocate buffer of size (?P<size>\d+)"), "B"),
    (re.compile(r"failed to allocate \S+ buffer of size (?P<size>\d+)"), "B"),
    (re.compile(r"failed to allocate buffer for kv cache"), None),
    (re.compile(r"unable to allocate \S+ buffer"), None),
    (re.compile(r"failed to allocate compute (?:pp |tg )?buffers"), None),
    (re.compile(r"CUDA out of memory\. Tried to allocate (?P<size>[\d.]+) (?P<unit>[GMK]i?B)"), None),
    (re.compile(r"CUDA out of memory"), None),
    (re.compile(r"OutOfMemoryError"), None),
    (re.compile(r"CUDA error: out of memory"), None),
    (re.compile(r"CUBLAS_STATUS_ALLOC_FAILED"), None),
    (re.compile(r"std::bad_alloc"), None),
    (re.compile(r"(?i)failed to create (?:llama_)?context"), None),
    # edgeserve's engine (server/engine) when llama_init_from_model returns NULL
    (re.compile(r"llama\.cpp could not create a context"), None),
    # edgeserve's engine refusing settings that do not fit the free memory (server/engine/preflight.py)
    (re.compile(r"does not fit: .* needed, .* free on "), None),
)
_POOL_PATTERN = re.compile(r"Not enough memory\. Please try to increase --mem-fraction-static")
_LOAD_PATTERN = re.compile(r"(?i)failed to load model")
_MISSING_PATTERN = re.compile(r"(?i)(no such file|does not exist|not a GGUF|failed to open|invalid magic)")


def _size(match: re.Match[str], unit: str | None) -> int | None:
    groups = match.groupdict()
    if "size" not in groups or groups["size"] is None:
        return None
    unit_name = (groups.get("unit") or unit or "B").upper()
    return int(float(groups["size"]) * _UNITS.get(unit_name, 1))


def find_oom(lines: Iterable[str]) -> tuple[str | None, int | None, OomCause | None]:
    """The first out-of-memory line, the largest failed allocation size seen, and the cause."""
    evidence: str | None = None
    cause: OomCause | None = None
    largest: int | None = None
    for line in lines:
        if _POOL_PATTERN.search(line):
            evidence = evidence or line.strip()
            cause = cause or "pool_too_small"
            continue
        for pattern, unit in _ALLOC_PATTERNS:
            m = pattern.search(line)
            if m is None:
                continue
            evidence = evidence or line.strip()
            cause = cause or "alloc"
            size = _size(m, unit)
            if size is not None:
                largest = max(largest or 0, size)
            break
    return evidence, largest, cause


def classify(
    lines: Sequence[str],
    exit_code: int | None,
    *,
    phase: Phase,
    available_bytes: int | None = None,
) -> Failure:
    """Turn a dead backend's log tail and exit status into a Failure."""
    evidence, requested, cause = find_oom(lines)
    if evidence is not None:
        return Failure(
            kind="oom",
            phase=phase,
            exit_code=exit_code,
            cause=cause,
            evidence=evidence,
            requested_bytes=requested,
            available_bytes=available_bytes,
        )
    load = next((ln.strip() for ln in lines if _LOAD_PATTERN.search(ln) or _MISSING_PATTERN.search(ln)), None)
    if load is not None:
        return Failure(
            kind="load_error",
            phase=phase,
            exit_code=exit_code,
            evidence=load,
            available_bytes=available_bytes,
        )
    last = next((ln.strip() for ln in reversed(lines) if ln.strip()), None)
    return Failure(
        kind="crash", phase=phase, exit_code=exit_code, evidence=last, available_bytes=available_bytes
    )
