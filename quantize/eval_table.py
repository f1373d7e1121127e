"""The quality table: quantize one source to several levels and measure each on the user's own text.

Per level: file size, bits per weight, perplexity on the text (llama.cpp logits, llama-perplexity's windows),
its increase over the source, and decode tokens/s on this machine. When the source is itself quantized the
levels are requantizations and compound its error, so the table is marked indicative only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from quantize.llama_session import LlamaSession
from quantize.model.levels import QuantLevel
from quantize.perplexity import perplexity
from quantize.pipeline import (
    PipelineError,
    QuantizeOptions,
    QuantizeResult,
    default_output,
    execute,
    prepare,
    quantized_types,
    read_source,
)
from quantize.runner import TensorProgress

DEFAULT_EVAL_NAME = "eval.txt"
DEFAULT_EVAL_CTX = 512
DEFAULT_DECODE_TOKENS = 32
INDICATIVE_NOTE = (
    "the source is already quantized: every level is a requantization of it, so this table is "
    "indicative only "
    "(quantize from an F16/BF16 GGUF for real figures)"
)


def default_eval_text() -> Path:
    """The evaluation text shipped with edgeserve (public-domain prose)."""
    return Path(str(resources.files("quantize").joinpath("data", DEFAULT_EVAL_NAME)))


@dataclass(frozen=True)
class QualityRow:
    """One model measured on the text. `ppl_increase` is relative to the source (0.05 = +5 %)."""

    label: str
    path: str
    size_bytes: int
    bits_per_weight: float
    ppl: float
    ppl_increase: float | None
    decode_tokens_per_second: float
    prompt_tokens_per_second: float
    is_source: bool = False


@dataclass(frozen=True)
class QualityTable:
    """Rows for the source and each level, with what they were measured on."""

    source: str
    eval_text: str
    n_ctx: int
    n_chunks: int
    n_scored: int
    n_threads: int
    is_indicative: bool
    rows: tuple[QualityRow, ...]

    @property
    def note(self) -> str:
        return INDICATIVE_NOTE if self.is_indicative else ""

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["note"] = self.note
        return data


@dataclass(frozen=True)
class _Measure:
    ppl: float
    n_chunks: int
    n_scored: int
    decode_tps: float
    prompt_tps: float


def measure(
    path: Path, text: str, *, n_ctx: int, max_tokens: int | None, n_threads: int, decode_tokens: int
) -> _Measure:
    """Perplexity of `text` and decode speed for the model at `path`."""
    with LlamaSession(path, n_ctx=n_ctx, n_batch=n_ctx, n_threads=n_threads) as session:
        p = perplexity(session, text, n_ctx=n_ctx, max_tokens=max_tokens)
        # a short prompt from the text, leaving room in the window for the decoded tokens
        prompt = session.tokenize(text)[: max(1, n_ctx // 4)]
        run = session.greedy(prompt, min(decode_tokens, n_ctx - len(prompt) - 1), stop_at_eog=False)
    return _Measure(p.ppl, p.n_chunks, p.n_scored, run.tokens_per_second, p.tokens_per_second)


def quality_table(
    src: Path,
    levels: list[QuantLevel],
    text_path: Path,
    options: QuantizeOptions,
    *,
    out_dir: Path | None = None,
    n_ctx: int = DEFAULT_EVAL_CTX,
    max_tokens: int | None = None,
    decode_tokens: int = DEFAULT_DECODE_TOKENS,
    on_step: Callable[[str], None] | None = None,
    on_progress: Callable[[TensorProgress], None] | None = None,
) -> tuple[QualityTable, list[QuantizeResult]]:
    """Quantize `src` to each level (verified, with manifests) and measure the source and every output."""
    spec = read_source(src)
    try:
        text = text_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PipelineError(f"cannot read the evaluation text {text_path}: {exc}") from None
    # Every refusal (requantize, existing outputs, disk) before the first quantization.
    plans = [
        prepare(
            src,
            lv,
            QuantizeOptions(
                out=default_output(src, lv, out_dir),
                n_threads=options.n_threads,
                imatrix=options.imatrix,
                allow_requantize=options.allow_requantize,
                force=options.force,
                verify_tokens=options.verify_tokens,
            ),
            spec=spec,
        )
        for lv in levels
    ]
    n_threads = plans[0].n_threads if plans else options.n_threads

    def step(msg: str) -> None:
        if on_step is not None:
            on_step(msg)

    step(f"measuring the source {src.name}")
    base = measure(
        src, text, n_ctx=n_ctx, max_tokens=max_tokens, n_threads=n_threads, decode_tokens=decode_tokens
    )
    rows = [
        QualityRow(
            label=f"source ({spec.file_type_name or '?'})",
            path=str(src),
            size_bytes=src.stat().st_size,
            bits_per_weight=round(spec.bits_per_weight, 4),
            ppl=base.ppl,
            ppl_increase=None,
            decode_tokens_per_second=base.decode_tps,
            prompt_tokens_per_second=base.prompt_tps,
            is_source=True,
        )
    ]
    results: list[QuantizeResult] = []
    for plan in plans:
        step(f"quantizing to {plan.level.name}")
        result = execute(plan, on_progress=on_progress)
        results.append(result)
        step(f"measuring {plan.level.name}")
        m = measure(result.out, text, n_ctx=n_ctx, max_tokens=max_tokens, n_threads=n_threads,
                    decode_tokens=decode_tokens)
        rows.append(
            QualityRow(
                label=plan.level.name,
                path=str(result.out),
                size_bytes=result.manifest.output.size_bytes,
                bits_per_weight=result.manifest.bits_per_weight,
                ppl=m.ppl,
                ppl_increase=m.ppl / base.ppl - 1.0,
                decode_tokens_per_second=m.decode_tps,
                prompt_tokens_per_second=m.prompt_tps,
            )
        )
    table = QualityTable(
        source=str(src),
        eval_text=str(text_path),
        n_ctx=n_ctx,
        n_chunks=base.n_chunks,
        n_scored=base.n_scored,
        n_threads=n_threads,
        is_indicative=bool(quantized_types(spec)),
        rows=tuple(rows),
    )
    return table, results
