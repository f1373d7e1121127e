"""Synthetic GGUFs written straight at a quantization level: llama-quantize's layout, random blocks.

Benchmarks on a rented GPU host pay for every second there, and the F16 file plus llama-quantize costs about
four minutes for an 8B shape. Speed and memory depend on each tensor's type and shape, never on the values,
so this writes the file llama-quantize would write (the per-tensor types of `quantized_tensors`, which mirrors
llama.cpp's type choice and is checked against llama-quantize in the tests) with random blocks whose scales
are set so the weights stay small and finite, about the 0.02 std of quantize.synthetic's F16 weights.

    python -m quantize.synthetic_quant OUT.gguf --preset llama31-8b --level Q4_K_M --vocab-from VOCAB.gguf
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from quantize.atomic import atomic_path
from quantize.model.levels import get_level
from quantize.model.tensor_types import quantized_tensors
from quantize.synthetic import (
    PRESETS,
    TINY,
    SyntheticShape,
    _add_metadata,
    _tokenizer_fields,
    synthetic_model_spec,
)

logger = logging.getLogger(__name__)

Q = gguf.GGMLQuantizationType


@dataclass(frozen=True)
class _BlockScales:
    """Where a block keeps its fp16 scale(s) and the values that give weights of about 0.02 std.

    For the K-quants with mins (Q4_K, Q5_K) a weight is d*sc*q - dmin*m with 6-bit sc, m and q of 4 or 5 bits:
    d is 0.02 over the std of sc*q, dmin makes the mean about zero. Q6_K is d*sc*(q-32) with an int8 sc, Q8_0
    d*q with an int8 q."""

    d_offset: int
    d: float
    dmin_offset: int | None = None
    dmin: float = 0.0


_SCALES: dict[Q, _BlockScales] = {
    Q.Q4_K: _BlockScales(0, 9.2e-5, 2, 6.9e-4),
    Q.Q5_K: _BlockScales(0, 4.5e-5, 2, 7.0e-4),
    Q.Q6_K: _BlockScales(208, 1.5e-5),
    Q.Q8_0: _BlockScales(0, 2.7e-4),
}
SUPPORTED_TYPES = ("F32", "F16", *(t.name for t in _SCALES))
WEIGHT_STD = 0.02


def _random_blocks(rng: np.random.Generator, qtype: Q, n_elements: int) -> np.ndarray:
    """Random bytes for `n_elements` weights of `qtype`, with every block's scales set (never NaN or inf)."""
    block_elems, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    n_blocks = n_elements // block_elems
    # 64-bit draws viewed as bytes: a third of the time of drawing bytes one by one.
    words = rng.integers(0, np.iinfo(np.uint64).max, size=-(-n_blocks * block_bytes // 8), dtype=np.uint64,
                         endpoint=True)
    blocks = words.view(np.uint8)[: n_blocks * block_bytes].reshape(n_blocks, block_bytes)
    scales = _SCALES[qtype]
    blocks[:, scales.d_offset : scales.d_offset + 2] = np.frombuffer(np.float16(scales.d).tobytes(), np.uint8)
    if scales.dmin_offset is not None:
        dmin = np.frombuffer(np.float16(scales.dmin).tobytes(), np.uint8)
        blocks[:, scales.dmin_offset : scales.dmin_offset + 2] = dmin
    return blocks


def _tensor_data(rng: np.random.Generator, qtype: Q, shape: tuple[int, ...]) -> np.ndarray:
    """The tensor in numpy order (rows first): floats for F32/F16, bytes (rows, bytes per row) otherwise."""
    n = int(np.prod(shape))
    if qtype == Q.F32:
        if len(shape) == 1:  # norm weights: all ones, as quantize.synthetic writes them
            return np.ones(shape, dtype=np.float32)
        return (rng.standard_normal(n, dtype=np.float32) * np.float32(WEIGHT_STD)).reshape(shape)
    if qtype == Q.F16:
        values = rng.standard_normal(n, dtype=np.float32) * np.float32(WEIGHT_STD)
        return values.astype(np.float16).reshape(shape)
    if qtype not in _SCALES:
        raise ValueError(f"tensor type {qtype.name} is not written here; "
                         f"supported: {', '.join(SUPPORTED_TYPES)}")
    rows = int(np.prod(shape[:-1]))
    return _random_blocks(rng, qtype, n).reshape(rows, -1)


def write_quantized_synthetic(
    path: str | os.PathLike[str],
    shape: SyntheticShape = TINY,
    *,
    level: str = "Q4_K_M",
    vocab_from: str | os.PathLike[str] | None = None,
    seed: int = 0,
    name: str = "edgeserve synthetic",
) -> Path:
    """Write a llama GGUF of `shape` at `level` with random blocks and the tokenizer of `vocab_from`."""
    lv = get_level(level)
    if not shape.is_k_quant_friendly:
        raise ValueError(f"{shape}: rows must be multiples of 256 for the K-quants (n_embd and n_ff)")
    if vocab_from is None:
        from quantize.bundled import smollm2_path

        vocab_from = smollm2_path()
    tokenizer = _tokenizer_fields(Path(vocab_from))
    n_vocab = next(len(v) for k, v, *_ in tokenizer if k == "tokenizer.ggml.tokens")
    tensors = quantized_tensors(synthetic_model_spec(shape, n_vocab, name=name), lv)
    types = {t.name: Q.__members__[t.ggml_type] for t in tensors}
    unsupported = sorted({q.name for q in types.values()} - set(SUPPORTED_TYPES))
    if unsupported:
        raise ValueError(f"{lv.name} uses {', '.join(unsupported)}, not written here; levels whose tensors "
                         f"are all in {', '.join(SUPPORTED_TYPES)} are (Q4_K_M, Q5_K_M, Q6_K, Q8_0)")
    out = Path(path)
    logger.info("writing %s: %s, vocab %d, %s", out, shape, n_vocab, lv.name)
    with atomic_path(out) as tmp:
        writer = gguf.GGUFWriter(tmp, "llama")
        try:
            _add_metadata(writer, shape, n_vocab, gguf.LlamaFileType(lv.llama_ftype), name)
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
            for k, v, vtype, sub_type in tokenizer:
                writer.add_key_value(k, v, vtype, sub_type=sub_type)
            for t in tensors:
                writer.add_tensor_info(t.name, tuple(reversed(t.shape)), np.dtype(np.float32), t.n_bytes,
                                       raw_dtype=types[t.name])
            writer.write_header_to_file(tmp)
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            rng = np.random.default_rng(seed)
            for t in tensors:
                writer.write_tensor_data(_tensor_data(rng, types[t.name], tuple(reversed(t.shape))))
            writer.flush()
        finally:
            writer.close()
    return out


def main(argv: list[str] | None = None) -> None:
    """`python -m quantize.synthetic_quant OUT.gguf --preset P --level Q4_K_M --vocab-from V.gguf`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--level", default="Q4_K_M", help="Q4_K_M, Q5_K_M, Q6_K or Q8_0")
    parser.add_argument("--vocab-from", type=Path, default=None, help="GGUF to copy the tokenizer from")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    write_quantized_synthetic(args.out, PRESETS[args.preset], level=args.level, vocab_from=args.vocab_from,
                              seed=args.seed)
    logger.info("wrote %s (%d bytes)", args.out, args.out.stat().st_size)


if __name__ == "__main__":
    main()
