"""Quantize a GGUF with llama.cpp: check the input, quantize atomically, verify, write the manifest.

    plan = prepare(src, level, options)      # every refusal happens here, before anything is written
    result = execute(plan, on_progress=...)  # llama.cpp in a child process -> verify -> rename -> manifest

Refusals and failures raise PipelineError with one line for the user. Nothing is left behind on failure or
Ctrl-C: the output is written under a temporary name in the destination directory and renamed only once it
verified.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from quantize.atomic import atomic_path
from quantize.budget.auto_level import LevelChoice
from quantize.imatrix import ImatrixError, load_imatrix
from quantize.llama_session import default_threads
from quantize.manifest import (
    BackgroundHash,
    FileInfo,
    Manifest,
    edgeserve_version,
    llama_cpp_info,
    utc_now,
    write_manifest,
)
from quantize.model.gguf_file import GGUFReadError, read_model_spec
from quantize.model.levels import QuantLevel, UnknownLevelError, get_level
from quantize.model.spec import ModelSpec
from quantize.model.units import MIB
from quantize.runner import QuantizeFailedError, QuantizeJob, TensorProgress, run_llama_quantize
from quantize.verify import Verification, expected_file_bytes, verify_output

# Free space kept beyond the expected output (the manifest, filesystem slack).
DISK_MARGIN_BYTES = 64 << 20
_UNQUANTIZED_TYPES = frozenset({"F32", "F16", "BF16", "F64"})
_QUANT_SUFFIX_RE = re.compile(r"[-_.](f32|f16|bf16|q\d(_[0-9a-z]+)*|iq\d(_[a-z]+)*)$", re.IGNORECASE)


class PipelineError(Exception):
    """A refusal or a failure of the pipeline, as one line for the user."""


@dataclass(frozen=True)
class QuantizeOptions:
    """How to quantize (the level is chosen separately)."""

    out: Path | None = None
    n_threads: int = 0
    imatrix: Path | None = None
    allow_requantize: bool = False
    force: bool = False
    verify_tokens: int = 8


@dataclass(frozen=True)
class QuantizePlan:
    """A checked request: everything needed to run, nothing written yet."""

    src: Path
    src_spec: ModelSpec
    src_size_bytes: int
    level: QuantLevel
    out: Path
    expected_bytes: int
    n_threads: int
    is_requantize: bool
    allow_requantize: bool
    imatrix: Path | None = None
    choice: LevelChoice | None = None
    verify_tokens: int = 8


@dataclass(frozen=True)
class QuantizeResult:
    """A verified output, its manifest and where both are."""

    out: Path
    manifest_path: Path
    manifest: Manifest
    verification: Verification = field(repr=False)


def read_source(src: Path) -> ModelSpec:
    """The source's ModelSpec; a missing, non-GGUF or truncated file becomes a PipelineError."""
    try:
        return read_model_spec(src)
    except GGUFReadError as exc:
        raise PipelineError(str(exc)) from None


def quantized_types(spec: ModelSpec) -> list[str]:
    """ggml types of the source's 2-D weights that are quantized already (none for F32/F16/BF16 sources)."""
    return sorted(
        {t.ggml_type for t in spec.tensors if t.n_dims >= 2 and t.ggml_type not in _UNQUANTIZED_TYPES}
    )


def resolve_level(name: str) -> QuantLevel:
    try:
        return get_level(name)
    except UnknownLevelError as exc:
        raise PipelineError(f"{exc} (or auto)") from None


def default_output(src: Path, level: QuantLevel, out_dir: Path | None = None) -> Path:
    """`dir/Model-F16.gguf` -> `dir/Model-Q4_K_M.gguf` (a quant suffix of the source is replaced)."""
    stem = _QUANT_SUFFIX_RE.sub("", src.stem) or src.stem
    return (out_dir or src.parent) / f"{stem}.{level.name}.gguf"


def prepare(
    src: Path,
    level: QuantLevel,
    options: QuantizeOptions,
    *,
    spec: ModelSpec | None = None,
    choice: LevelChoice | None = None,
) -> QuantizePlan:
    """Check the request; raise PipelineError for anything that would fail or overwrite by surprise."""
    src = Path(src)
    spec = spec or read_source(src)
    src_size = src.stat().st_size
    already = quantized_types(spec)
    if already and not options.allow_requantize:
        raise PipelineError(
            f"{src} is already quantized ({spec.file_type_name or ', '.join(already)}); quantizing it again "
            "compounds the error: start from an F16/BF16/F32 GGUF, or pass --allow-requantize"
        )
    if not level.is_quantized and already:
        raise PipelineError(f"{level.name} is not a quantization of the already quantized {src}")
    out = Path(options.out) if options.out else default_output(src, level)
    if out.resolve() == src.resolve():
        raise PipelineError(f"the output {out} is the source itself; choose another --out")
    if out.exists() and not options.force:
        raise PipelineError(f"{out} exists; pass --force to overwrite it")
    if out.exists() and not out.is_file():
        raise PipelineError(f"{out} exists and is not a file")
    if options.imatrix is not None:
        try:
            load_imatrix(options.imatrix)
        except ImatrixError as exc:
            raise PipelineError(str(exc)) from None
    expected = expected_file_bytes(spec, src_size, level)
    _check_disk(out, expected)
    return QuantizePlan(
        src=src,
        src_spec=spec,
        src_size_bytes=src_size,
        level=level,
        out=out,
        expected_bytes=expected,
        n_threads=options.n_threads or default_threads(),
        is_requantize=bool(already),
        allow_requantize=options.allow_requantize,
        imatrix=options.imatrix,
        choice=choice,
        verify_tokens=options.verify_tokens,
    )


def _check_disk(out: Path, expected: int) -> None:
    parent = out.parent
    probe = parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < expected + DISK_MARGIN_BYTES:
        raise PipelineError(
            f"not enough free space in {parent}: the output needs about {expected / MIB:,.0f} MiB, "
            f"{free / MIB:,.0f} MiB are free"
        )


def execute(
    plan: QuantizePlan, *, on_progress: Callable[[TensorProgress], None] | None = None
) -> QuantizeResult:
    """Quantize, verify under the temporary name, rename into place, then write the manifest beside it."""
    hasher = BackgroundHash(plan.src)
    with atomic_path(plan.out) as tmp:
        job = QuantizeJob(
            src=str(plan.src),
            dst=str(tmp),
            ftype=plan.level.llama_ftype,
            nthread=plan.n_threads,
            allow_requantize=plan.allow_requantize,
            imatrix=str(plan.imatrix) if plan.imatrix else None,
        )
        try:
            run = run_llama_quantize(job, on_progress)
        except QuantizeFailedError as exc:
            raise PipelineError(str(exc)) from None
        try:
            verification = verify_output(
                tmp,
                src=plan.src_spec,
                src_size_bytes=plan.src_size_bytes,
                level=plan.level,
                written_types=run.tensor_types,
                n_decode=plan.verify_tokens,
                n_threads=plan.n_threads,
            )
        except GGUFReadError as exc:
            raise PipelineError(str(exc)) from None
        if not verification.is_ok:
            failed = "; ".join(f"{c.name}: {c.detail}" for c in verification.failures())
            raise PipelineError(
                f"the {plan.level.name} output failed verification ({failed}); nothing was written"
            )
    out_spec = verification.spec
    manifest = Manifest(
        edgeserve_version=edgeserve_version(),
        created_utc=utc_now(),
        source=FileInfo(
            path=str(plan.src.resolve()),
            size_bytes=plan.src_size_bytes,
            sha256=hasher.result(),
            file_type=plan.src_spec.file_type_name,
        ),
        output=FileInfo(
            path=str(plan.out.resolve()),
            size_bytes=verification.size_bytes,
            file_type=out_spec.file_type_name,
        ),
        level=plan.level.name,
        llama_ftype=plan.level.llama_ftype,
        bits_per_weight=round(out_spec.bits_per_weight, 4),
        n_params=out_spec.n_params,
        tensor_types=verification.tensor_type_counts,
        bytes_by_type=out_spec.bytes_by_type,
        expected_bytes=plan.expected_bytes,
        n_threads=plan.n_threads,
        quantize_seconds=round(run.seconds, 3),
        verify_seconds=round(verification.seconds, 3),
        allow_requantize=plan.allow_requantize,
        imatrix=str(plan.imatrix) if plan.imatrix else None,
        llama=llama_cpp_info(),
        budget=_budget_record(plan.choice),
        checks=verification.checks,
        sample=verification.sample,
    )
    path = write_manifest(manifest, plan.out)
    return QuantizeResult(out=plan.out, manifest_path=path, manifest=manifest, verification=verification)


def _budget_record(choice: LevelChoice | None) -> dict[str, object] | None:
    if choice is None:
        return None
    return {"chosen_for": choice.settings(), "budget": choice.budget.model_dump(mode="json")}


__all__ = [
    "PipelineError",
    "QuantizeOptions",
    "QuantizePlan",
    "QuantizeResult",
    "default_output",
    "execute",
    "prepare",
    "quantized_types",
    "read_source",
    "resolve_level",
]
