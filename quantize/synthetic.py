"""Synthetic llama GGUFs: real shapes and a real tokenizer, random weights.

Tests and benchmarks need F16/BF16/F32 sources (quantization starts from them) and real model shapes (speed
and
memory depend on shapes and types, never on weight values) without downloading weights. The tokenizer (every
`tokenizer.*` key, chat template included) is copied from a real GGUF so that llama.cpp tokenizes text exactly
as
the real model would. Tensors are generated and written one at a time, so an 8B-shaped F16 file (16 GB) needs
only
about the largest tensor in memory. The file appears atomically: written to a temporary name, then renamed.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gguf
import numpy as np

from quantize.atomic import atomic_path

if TYPE_CHECKING:
    from quantize.model.spec import ModelSpec

logger = logging.getLogger(__name__)

# Small enough that logits stay in a sane range through the residual stream (the output of an RMS-normed
# hidden
# state times a 0.02-std matrix has a std of about 0.02 * sqrt(n_embd)).
WEIGHT_STD = 0.02
# Rows are generated in chunks of this many elements so that float32 temporaries stay small.
_CHUNK_ELEMENTS = 1 << 24

_FTYPES: dict[str, tuple[gguf.GGMLQuantizationType, gguf.LlamaFileType]] = {
    "F32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "F16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "BF16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
}
SUPPORTED_FTYPES = tuple(_FTYPES)


@dataclass(frozen=True)
class SyntheticShape:
    """Hyperparameters of a llama-architecture model (the vocabulary comes from the tokenizer source)."""

    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    n_ff: int
    n_ctx_train: int = 4096
    rope_freq_base: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_embeddings: bool = False

    def __post_init__(self) -> None:
        for name in ("n_layer", "n_embd", "n_head", "n_head_kv", "n_ff", "n_ctx_train"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd {self.n_embd} is not a multiple of n_head {self.n_head}")
        if self.n_head % self.n_head_kv:
            raise ValueError(f"n_head {self.n_head} is not a multiple of n_head_kv {self.n_head_kv}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def is_k_quant_friendly(self) -> bool:
        """K-quants work on 256-wide blocks: every row (n_embd, n_ff) must be a multiple of 256."""
        return self.n_embd % 256 == 0 and self.n_ff % 256 == 0

    def n_params(self, n_vocab: int) -> int:
        """Weights in the file (embeddings and output included)."""
        e, kv = self.n_embd, self.n_head_kv * self.head_dim
        per_layer = 2 * e * e + 2 * e * kv + 3 * e * self.n_ff + 2 * e
        output = 0 if self.tie_embeddings else n_vocab * e
        return n_vocab * e + output + e + self.n_layer * per_layer


# Llama-3.1-8B (use with the Llama-3 tokenizer, vocab 128256).
LLAMA31_8B = SyntheticShape(
    n_layer=32, n_embd=4096, n_head=32, n_head_kv=8, n_ff=14336, n_ctx_train=131072, rope_freq_base=500000.0
)
# Llama-3.2-1B shapes (tied embeddings, as the real model).
LLAMA32_1B = SyntheticShape(
    n_layer=16,
    n_embd=2048,
    n_head=32,
    n_head_kv=8,
    n_ff=8192,
    n_ctx_train=131072,
    rope_freq_base=500000.0,
    tie_embeddings=True,
)
# Llama-3.2-3B shapes (tied embeddings, as the real model).
LLAMA32_3B = SyntheticShape(
    n_layer=28,
    n_embd=3072,
    n_head=24,
    n_head_kv=8,
    n_ff=8192,
    n_ctx_train=131072,
    rope_freq_base=500000.0,
    tie_embeddings=True,
)
# The smallest shape the K-quants accept (rows of 256); with grouped-query attention like the real models.
TINY = SyntheticShape(n_layer=2, n_embd=256, n_head=4, n_head_kv=2, n_ff=512, n_ctx_train=2048)

PRESETS: dict[str, SyntheticShape] = {"tiny": TINY, "llama31-8b": LLAMA31_8B, "llama32-1b": LLAMA32_1B,
                                      "llama32-3b": LLAMA32_3B}


@dataclass(frozen=True)
class _TensorPlan:
    name: str
    shape: tuple[int, ...]  # numpy order: (rows, row_length)
    std: float  # 0.0 means a norm weight, all ones


def _tensor_plan(shape: SyntheticShape, n_vocab: int) -> list[_TensorPlan]:
    e, hd = shape.n_embd, shape.head_dim
    plans = [_TensorPlan("token_embd.weight", (n_vocab, e), WEIGHT_STD)]
    for i in range(shape.n_layer):
        blk = f"blk.{i}"
        plans += [
            _TensorPlan(f"{blk}.attn_norm.weight", (e,), 0.0),
            _TensorPlan(f"{blk}.attn_q.weight", (shape.n_head * hd, e), WEIGHT_STD),
            _TensorPlan(f"{blk}.attn_k.weight", (shape.n_head_kv * hd, e), WEIGHT_STD),
            _TensorPlan(f"{blk}.attn_v.weight", (shape.n_head_kv * hd, e), WEIGHT_STD),
            _TensorPlan(f"{blk}.attn_output.weight", (e, shape.n_head * hd), WEIGHT_STD),
            _TensorPlan(f"{blk}.ffn_norm.weight", (e,), 0.0),
            _TensorPlan(f"{blk}.ffn_gate.weight", (shape.n_ff, e), WEIGHT_STD),
            _TensorPlan(f"{blk}.ffn_up.weight", (shape.n_ff, e), WEIGHT_STD),
            _TensorPlan(f"{blk}.ffn_down.weight", (e, shape.n_ff), WEIGHT_STD),
        ]
    plans.append(_TensorPlan("output_norm.weight", (e,), 0.0))
    if not shape.tie_embeddings:
        plans.append(_TensorPlan("output.weight", (n_vocab, e), WEIGHT_STD))
    return plans


def _tokenizer_fields(
    vocab_from: Path,
) -> list[tuple[str, Any, gguf.GGUFValueType, gguf.GGUFValueType | None]]:
    """Every tokenizer.* key of a real GGUF, as (key, value, type, array sub-type)."""
    try:
        reader = gguf.GGUFReader(vocab_from)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{vocab_from}: cannot read a tokenizer from it ({exc})") from exc
    fields = []
    for field in reader.fields.values():
        if not field.name.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        fields.append((field.name, field.contents(), vtype, sub_type))
    if not any(name == "tokenizer.ggml.tokens" for name, *_ in fields):
        raise ValueError(f"{vocab_from}: no tokenizer.ggml.tokens, not a usable tokenizer source")
    return fields


def _random_tensor(
    rng: np.random.Generator, plan: _TensorPlan, qtype: gguf.GGMLQuantizationType
) -> np.ndarray[Any, Any]:
    if plan.std == 0.0 or len(plan.shape) == 1:
        # Norm weights stay F32 in every llama.cpp file type ("except 1d tensors").
        return np.ones(plan.shape, dtype=np.float32)
    n = int(np.prod(plan.shape))
    if qtype == gguf.GGMLQuantizationType.F32:
        return (rng.standard_normal(n, dtype=np.float32) * np.float32(plan.std)).reshape(plan.shape)
    out_dtype = np.float16 if qtype == gguf.GGMLQuantizationType.F16 else np.uint16
    out = np.empty(n, dtype=out_dtype)
    for start in range(0, n, _CHUNK_ELEMENTS):
        chunk = rng.standard_normal(min(_CHUNK_ELEMENTS, n - start), dtype=np.float32)
        chunk *= np.float32(plan.std)
        if out_dtype == np.float16:
            out[start : start + chunk.size] = chunk
        else:
            out[start : start + chunk.size] = _to_bf16_bits(chunk)
    return out.reshape(plan.shape)


def _to_bf16_bits(values: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """float32 -> bfloat16 bits, rounded to nearest even as ggml_fp32_to_bf16 does (inputs are finite)."""
    bits = values.view(np.uint32)
    rounded = bits + (np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1)))
    return (rounded >> np.uint32(16)).astype(np.uint16)


def write_synthetic_gguf(
    path: str | os.PathLike[str],
    shape: SyntheticShape | None = None,
    *,
    vocab_from: str | os.PathLike[str] | None = None,
    ftype: str = "F16",
    seed: int = 0,
    arch: str = "llama",
    n_layer: int | None = None,
    n_embd: int | None = None,
    n_head: int | None = None,
    n_head_kv: int | None = None,
    n_ff: int | None = None,
    n_ctx_train: int | None = None,
    name: str = "edgeserve synthetic",
) -> Path:
    """Write a llama GGUF with random weights and the tokenizer of `vocab_from`; return its path.

    `shape` defaults to TINY; the keyword dimensions override single fields of it. `vocab_from` defaults to
    the
    bundled SmolLM2 (use the Llama-3 vocab GGUF for Llama-3 shapes). n_vocab is the tokenizer's size.
    """
    if arch != "llama":
        raise ValueError(f"unsupported architecture {arch!r}: only 'llama' is written")
    key = ftype.upper()
    if key not in _FTYPES:
        raise ValueError(f"unsupported ftype {ftype!r}; supported: {', '.join(SUPPORTED_FTYPES)}")
    qtype, file_type = _FTYPES[key]
    overrides: dict[str, Any] = {
        k: v
        for k, v in dict(
            n_layer=n_layer,
            n_embd=n_embd,
            n_head=n_head,
            n_head_kv=n_head_kv,
            n_ff=n_ff,
            n_ctx_train=n_ctx_train,
        ).items()
        if v is not None
    }
    model_shape = dataclasses.replace(shape or TINY, **overrides)
    if vocab_from is None:
        from quantize.bundled import smollm2_path

        vocab_from = smollm2_path()

    tokenizer = _tokenizer_fields(Path(vocab_from))
    n_vocab = next(len(v) for k, v, *_ in tokenizer if k == "tokenizer.ggml.tokens")
    plans = _tensor_plan(model_shape, n_vocab)
    out = Path(path)
    logger.info("writing %s: %s, vocab %d, %s", out, model_shape, n_vocab, key)

    with atomic_path(out) as tmp:
        writer = gguf.GGUFWriter(tmp, arch)
        try:
            _add_metadata(writer, model_shape, n_vocab, file_type, name)
            for k, v, vtype, sub_type in tokenizer:
                writer.add_key_value(k, v, vtype, sub_type=sub_type)
            for plan in plans:
                is_norm = plan.std == 0.0
                tensor_qtype = gguf.GGMLQuantizationType.F32 if is_norm else qtype
                itemsize = 4 if tensor_qtype == gguf.GGMLQuantizationType.F32 else 2
                dtype = {4: np.float32, 2: np.float16}[itemsize]
                raw = tensor_qtype if tensor_qtype == gguf.GGMLQuantizationType.BF16 else None
                n_bytes = int(np.prod(plan.shape)) * itemsize
                writer.add_tensor_info(plan.name, plan.shape, np.dtype(dtype), n_bytes, raw_dtype=raw)
            writer.write_header_to_file(tmp)
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            rng = np.random.default_rng(seed)
            for plan in plans:
                writer.write_tensor_data(_random_tensor(rng, plan, qtype))
            writer.flush()
        finally:
            writer.close()
    return out


def _add_metadata(
    writer: gguf.GGUFWriter, shape: SyntheticShape, n_vocab: int, file_type: gguf.LlamaFileType, name: str
) -> None:
    writer.add_name(name)
    writer.add_file_type(int(file_type))
    writer.add_vocab_size(n_vocab)
    writer.add_context_length(shape.n_ctx_train)
    writer.add_embedding_length(shape.n_embd)
    writer.add_block_count(shape.n_layer)
    writer.add_feed_forward_length(shape.n_ff)
    writer.add_head_count(shape.n_head)
    writer.add_head_count_kv(shape.n_head_kv)
    writer.add_rope_dimension_count(shape.head_dim)
    writer.add_rope_freq_base(shape.rope_freq_base)
    writer.add_layer_norm_rms_eps(shape.rms_norm_eps)


def synthetic_model_spec(
    shape: SyntheticShape, n_vocab: int, *, ftype: str = "F16", name: str = "edgeserve synthetic"
) -> ModelSpec:
    """The ModelSpec such a file would read back as, without writing it (for calculators)."""
    from quantize.model.spec import ModelSpec, TensorInfo

    qtype, file_type = _FTYPES[ftype.upper()]
    tensors = []
    for plan in _tensor_plan(shape, n_vocab):
        ttype = gguf.GGMLQuantizationType.F32 if plan.std == 0.0 else qtype
        block, type_size = gguf.GGML_QUANT_SIZES[ttype]
        n = int(np.prod(plan.shape))
        tensors.append(
            TensorInfo(
                name=plan.name,
                shape=tuple(reversed(plan.shape)),
                ggml_type=ttype.name,
                n_bytes=n // block * type_size,
            )
        )
    return ModelSpec(
        path=None,
        architecture="llama",
        name=name,
        n_layer=shape.n_layer,
        n_embd=shape.n_embd,
        n_head=shape.n_head,
        n_head_kv=(shape.n_head_kv,) * shape.n_layer,
        head_dim_k=shape.head_dim,
        head_dim_v=shape.head_dim,
        n_ff=shape.n_ff,
        n_vocab=n_vocab,
        n_ctx_train=shape.n_ctx_train,
        file_type=int(file_type),
        file_type_name=file_type.name.removeprefix("MOSTLY_"),
        tensors=tuple(tensors),
    )


def main(argv: list[str] | None = None) -> None:
    """`python -m quantize.synthetic OUT.gguf --preset llama31-8b --vocab-from VOCAB.gguf` (GPU benches)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--vocab-from", type=Path, default=None, help="GGUF to copy the tokenizer from")
    parser.add_argument("--ftype", choices=SUPPORTED_FTYPES, default="F16")
    parser.add_argument("--n-layer", type=int, default=None, help="override the preset's layer count")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    write_synthetic_gguf(
        args.out,
        PRESETS[args.preset],
        vocab_from=args.vocab_from,
        ftype=args.ftype,
        seed=args.seed,
        n_layer=args.n_layer,
    )
    logger.info("wrote %s (%d bytes)", args.out, args.out.stat().st_size)


if __name__ == "__main__":
    main()
