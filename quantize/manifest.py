"""manifest.json: what was quantized, how, with which llama.cpp, and what came out; written beside the output.

The manifest lets anyone tell later which source a GGUF came from (path and sha256), which level and llama.cpp
produced it, what it weighs per tensor type, and for which card/context budget the level was chosen.
"""

from __future__ import annotations

import datetime as _dt
import threading
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from quantize.atomic import sha256_file, write_json_atomic

MANIFEST_SUFFIX = ".manifest.json"


class FileInfo(BaseModel):
    model_config = ConfigDict(frozen=True)

    path: str
    size_bytes: int = Field(ge=0)
    sha256: str | None = None
    file_type: str | None = None


class LlamaCppInfo(BaseModel):
    model_config = ConfigDict(frozen=True)

    llama_cpp_python: str
    llama_cpp: str = Field(description="llama_version()")
    system_info: str = Field(description="llama_print_system_info()")


class CheckResult(BaseModel):
    """One verification check; `is_fatal` checks fail the run, the others are warnings."""

    model_config = ConfigDict(frozen=True)

    name: str
    is_ok: bool
    is_fatal: bool = True
    detail: str = ""


class Manifest(BaseModel):
    """Everything about one quantization run, JSON-printable."""

    model_config = ConfigDict(frozen=True)

    edgeserve_version: str
    created_utc: str
    source: FileInfo
    output: FileInfo
    level: str
    llama_ftype: int
    bits_per_weight: float
    n_params: int
    tensor_types: dict[str, int] = Field(description="tensor count per ggml type")
    bytes_by_type: dict[str, int]
    expected_bytes: int = Field(description="the output size edgeserve predicted before quantizing")
    n_threads: int
    quantize_seconds: float
    verify_seconds: float
    allow_requantize: bool
    imatrix: str | None = None
    llama: LlamaCppInfo
    budget: dict[str, Any] | None = Field(
        default=None, description="the budget an automatic level was chosen for"
    )
    checks: tuple[CheckResult, ...] = ()
    sample: str = Field(default="", description="greedy continuation decoded during verification")

    @property
    def is_verified(self) -> bool:
        return all(c.is_ok for c in self.checks if c.is_fatal)


def manifest_path(output: Path) -> Path:
    """`model.Q4_K_M.gguf` -> `model.Q4_K_M.manifest.json`: one manifest per output, many outputs per dir."""
    return output.with_name(output.stem + MANIFEST_SUFFIX)


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def llama_cpp_info() -> LlamaCppInfo:
    import llama_cpp

    return LlamaCppInfo(
        llama_cpp_python=str(llama_cpp.__version__),
        llama_cpp=llama_cpp.llama_version().decode(errors="replace"),
        system_info=llama_cpp.llama_print_system_info().decode(errors="replace").strip(" |"),
    )


def edgeserve_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("edgeserve")
    except metadata.PackageNotFoundError:
        return "unknown"




class BackgroundHash:
    """sha256 of a file computed in a thread (hashlib releases the GIL), overlapping the quantization."""

    def __init__(self, path: Path) -> None:
        self._result: str | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(path,), daemon=True, name="edgeserve-sha256")
        self._thread.start()

    def _run(self, path: Path) -> None:
        try:
            self._result = sha256_file(path)
        except BaseException as exc:  # handed to the caller in result()
            self._error = exc

    def result(self) -> str:
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result


def write_manifest(manifest: Manifest, output: Path) -> Path:
    path = manifest_path(output)
    write_json_atomic(path, manifest.model_dump(mode="json"))
    return path
