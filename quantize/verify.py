"""Check a new quantized GGUF: read it back with `gguf`, compare with the expectation, decode with llama.cpp.

Fatal checks (the output is not what was asked for): the file parses, its file type is the level's, each
tensor
has the type llama.cpp said it wrote, the size is the predicted one within a tolerance, and llama.cpp loads it
and decodes a few tokens greedily with finite logits. A warning (not fatal): edgeserve's own prediction of the
type mix (tensor_types.quantized_tensors) differs from llama.cpp's choice: the calculator is out of date.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from quantize.llama_session import LlamaLoadError, LlamaSession
from quantize.manifest import CheckResult
from quantize.model.gguf_file import GGUFReadError, read_model_spec
from quantize.model.levels import QuantLevel
from quantize.model.spec import ModelSpec
from quantize.model.tensor_types import quantized_tensors
from quantize.model.units import MIB

# The output's size may differ from the prediction by metadata changes (quantization keys added,
# general.file_type
# rewritten) and alignment padding; tensor bytes themselves are exact.
SIZE_TOLERANCE_FRACTION = 0.01
SIZE_TOLERANCE_BYTES = MIB
VERIFY_PROMPT = "The quick brown fox"


@dataclass(frozen=True)
class Verification:
    """The checks, the output as read back, and the greedy sample."""

    spec: ModelSpec
    size_bytes: int
    checks: tuple[CheckResult, ...]
    sample: str
    seconds: float

    @property
    def is_ok(self) -> bool:
        return all(c.is_ok for c in self.checks if c.is_fatal)

    @property
    def tensor_type_counts(self) -> dict[str, int]:
        return dict(Counter(t.ggml_type for t in self.spec.tensors).most_common())

    def failures(self) -> list[CheckResult]:
        return [c for c in self.checks if c.is_fatal and not c.is_ok]


def expected_file_bytes(src: ModelSpec, src_size_bytes: int, level: QuantLevel) -> int:
    """Predicted size of the output file: the source's metadata size plus the tensors at `level`."""
    metadata_bytes = max(0, src_size_bytes - src.weights_bytes)
    return metadata_bytes + sum(t.n_bytes for t in quantized_tensors(src, level))


def _type_check(out: ModelSpec, written: dict[str, str]) -> CheckResult:
    actual = {t.name: t.ggml_type for t in out.tensors}
    if not written:
        return CheckResult(name="tensor types", is_ok=False, detail="llama.cpp reported no tensors")
    diff = [f"{n}: file {actual.get(n)} / llama.cpp {w}" for n, w in written.items() if actual.get(n) != w]
    missing = sorted(set(actual) - set(written))
    ok = not diff and not missing
    detail = "as llama.cpp reported" if ok else "; ".join(diff[:3] + [f"unreported {m}" for m in missing[:3]])
    return CheckResult(name="tensor types", is_ok=ok, detail=detail)


def _prediction_check(src: ModelSpec, out: ModelSpec, level: QuantLevel) -> CheckResult:
    predicted = {t.name: t.ggml_type for t in quantized_tensors(src, level)}
    diff = [
        f"{t.name}: {t.ggml_type} (predicted {predicted.get(t.name)})"
        for t in out.tensors
        if predicted.get(t.name) != t.ggml_type
    ]
    detail = "type mix as predicted" if not diff else f"{len(diff)} differ, e.g. " + "; ".join(diff[:3])
    return CheckResult(name="predicted mix", is_ok=not diff, is_fatal=False, detail=detail)


def verify_output(
    path: Path,
    *,
    src: ModelSpec,
    src_size_bytes: int,
    level: QuantLevel,
    written_types: dict[str, str],
    n_decode: int = 8,
    n_threads: int | None = None,
) -> Verification:
    """Run every check on `path` (the output, possibly still under its temporary name)."""
    t0 = time.monotonic()
    checks: list[CheckResult] = []
    try:
        out = read_model_spec(path)
    except GGUFReadError as exc:
        raise GGUFReadError(f"the output does not read back: {exc}") from exc
    size = path.stat().st_size
    checks.append(CheckResult(name="gguf", is_ok=True, detail=f"{len(out.tensors)} tensors read back"))
    ftype_ok = out.file_type == level.llama_ftype
    checks.append(
        CheckResult(
            name="file type",
            is_ok=ftype_ok,
            detail=f"general.file_type {out.file_type} ({out.file_type_name}), expected {level.llama_ftype}",
        )
    )
    checks.append(_type_check(out, written_types))
    checks.append(_prediction_check(src, out, level))
    expected = expected_file_bytes(src, src_size_bytes, level)
    tolerance = max(SIZE_TOLERANCE_BYTES, int(expected * SIZE_TOLERANCE_FRACTION))
    checks.append(
        CheckResult(
            name="size",
            is_ok=abs(size - expected) <= tolerance,
            detail=f"{size} bytes, predicted {expected} (+/- {tolerance})",
        )
    )
    sample = ""
    try:
        with LlamaSession(path, n_ctx=128, n_threads=n_threads) as session:
            run = session.greedy(VERIFY_PROMPT, n_decode, stop_at_eog=False)
        sample = run.text
        checks.append(
            CheckResult(
                name="decode",
                is_ok=len(run.tokens) == n_decode,
                detail=f"llama.cpp decoded {len(run.tokens)} tokens greedily",
            )
        )
    except (LlamaLoadError, RuntimeError) as exc:
        checks.append(CheckResult(name="decode", is_ok=False, detail=str(exc)))
    return Verification(
        spec=out, size_bytes=size, checks=tuple(checks), sample=sample, seconds=time.monotonic() - t0
    )
