"""Importance matrices for llama_model_quantize, read as llama-quantize reads them.

Two formats exist (common/imatrix-loader.cpp): the GGUF one written by current llama-imatrix (tensors
`<name>.in_sum2` and `<name>.counts`, F32, plus imatrix.datasets / chunk_count / chunk_size keys) and the
legacy
binary .dat. The values handed to llama.cpp are normalised the way tools/quantize/quantize.cpp does it: GGUF
sums
divided by their per-expert counts (1 where a count is 0), legacy sums divided by the call count. llama.cpp
takes
them through `llama_model_quantize_params.imatrix`, an array of {name, data, size} closed by a NULL name.
"""

from __future__ import annotations

import ctypes
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import llama_cpp
import numpy as np

_SUM_SUFFIX = ".in_sum2"
_COUNT_SUFFIX = ".counts"
_REQUIRED_KEYS = ("imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size")


class ImatrixError(ValueError):
    """The importance matrix file cannot be used; the message names the file."""


@dataclass(frozen=True)
class Imatrix:
    """Normalised importance values per weight name."""

    path: str
    entries: dict[str, np.ndarray[Any, Any]]
    chunk_count: int
    datasets: tuple[str, ...]

    def as_c_array(self) -> tuple[ctypes.Array[Any], list[Any]]:
        """The NULL-terminated llama_model_imatrix_data array, and the buffers that must outlive it."""
        keep: list[Any] = []
        arr = (llama_cpp.llama_model_imatrix_data * (len(self.entries) + 1))()
        for i, (name, values) in enumerate(self.entries.items()):
            name_b = name.encode()
            data = np.ascontiguousarray(values, dtype=np.float32)
            keep += [name_b, data]
            arr[i].name = name_b
            arr[i].data = data.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            arr[i].size = data.size
        arr[len(self.entries)].name = None
        return arr, keep


def load_imatrix(path: str | Path) -> Imatrix:
    """Read a GGUF or legacy importance matrix. Raises ImatrixError with a one-line reason."""
    p = Path(path)
    if not p.is_file():
        raise ImatrixError(f"{p}: no such imatrix file")
    with p.open("rb") as fh:
        magic = fh.read(4)
    entries, chunk_count, datasets = _load_gguf(p) if magic == b"GGUF" else _load_legacy(p)
    if not entries:
        raise ImatrixError(f"{p}: the imatrix has no entries")
    for name, values in entries.items():
        if not np.all(np.isfinite(values)):
            raise ImatrixError(f"{p}: non-finite values for {name}")
    return Imatrix(path=str(p), entries=entries, chunk_count=chunk_count, datasets=datasets)


def _load_gguf(p: Path) -> tuple[dict[str, np.ndarray[Any, Any]], int, tuple[str, ...]]:
    try:
        reader = gguf.GGUFReader(p)
    except Exception as exc:  # the reader raises assorted errors on damaged files
        raise ImatrixError(f"{p}: cannot parse the GGUF imatrix ({exc})") from exc
    missing = [k for k in _REQUIRED_KEYS if k not in reader.fields]
    if missing:
        raise ImatrixError(f"{p}: missing imatrix metadata {', '.join(missing)}; not an imatrix GGUF?")
    sums: dict[str, np.ndarray[Any, Any]] = {}
    counts: dict[str, np.ndarray[Any, Any]] = {}
    for t in reader.tensors:
        if t.tensor_type != gguf.GGMLQuantizationType.F32:
            raise ImatrixError(f"{p}: tensor {t.name} is {t.tensor_type.name}, imatrix tensors must be F32")
        if t.name.endswith(_SUM_SUFFIX):
            sums[t.name.removesuffix(_SUM_SUFFIX)] = np.asarray(t.data, dtype=np.float32).reshape(-1)
        elif t.name.endswith(_COUNT_SUFFIX):
            counts[t.name.removesuffix(_COUNT_SUFFIX)] = np.asarray(t.data, dtype=np.float32).reshape(-1)
    entries: dict[str, np.ndarray[Any, Any]] = {}
    for name, s in sums.items():
        if name not in counts:
            raise ImatrixError(f"{p}: mismatched sums and counts for {name}")
        c = np.rint(counts[name])
        if c.size == 0 or s.size % c.size:
            raise ImatrixError(f"{p}: {name} has {s.size} sums for {c.size} counts")
        per = s.reshape(c.size, -1)
        safe = np.where(c > 0, c, 1.0)[:, None]
        entries[name] = np.where(c[:, None] > 0, per / safe, 1.0).astype(np.float32).reshape(-1)
    chunk_count = int(reader.fields["imatrix.chunk_count"].contents())
    datasets = tuple(str(d) for d in reader.fields["imatrix.datasets"].contents())
    return entries, chunk_count, datasets


def _load_legacy(p: Path) -> tuple[dict[str, np.ndarray[Any, Any]], int, tuple[str, ...]]:
    data = p.read_bytes()
    off = 0

    def take(fmt: str) -> tuple[Any, ...]:
        nonlocal off
        size = struct.calcsize(fmt)
        if off + size > len(data):
            raise ImatrixError(f"{p}: truncated legacy imatrix (not a GGUF either)")
        out = struct.unpack_from(fmt, data, off)
        off += size
        return out

    (n_entries,) = take("<i")
    if n_entries < 1 or n_entries > 1_000_000:
        raise ImatrixError(f"{p}: not an imatrix (neither GGUF nor the legacy format)")
    entries: dict[str, np.ndarray[Any, Any]] = {}
    for _ in range(n_entries):
        (name_len,) = take("<i")
        if name_len <= 0 or name_len > 4096:
            raise ImatrixError(f"{p}: not an imatrix (bad entry name length {name_len})")
        name = take(f"<{name_len}s")[0].decode("utf-8", errors="replace")
        ncall, nval = take("<ii")
        if nval < 1:
            raise ImatrixError(f"{p}: entry {name} has {nval} values")
        if off + 4 * nval > len(data):
            raise ImatrixError(f"{p}: truncated legacy imatrix")
        sums = np.frombuffer(data, dtype="<f4", count=nval, offset=off).astype(np.float32)
        off += 4 * nval
        entries[name] = sums / ncall if ncall > 0 else sums
    chunk_count = 0
    datasets: tuple[str, ...] = ()
    if off + 4 <= len(data):
        (chunk_count,) = take("<i")
        if off + 4 <= len(data):
            (ds_len,) = take("<i")
            if 0 < ds_len <= len(data) - off:
                datasets = (take(f"<{ds_len}s")[0].decode("utf-8", errors="replace"),)
    return entries, chunk_count, datasets
