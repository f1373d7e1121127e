"""Read a GGUF file into a ModelSpec (no llama.cpp, no weights loaded).

The header is parsed by quantize.model.gguf_header (keys and value types from the `gguf` package); gguf's
GGUFReader is avoided because it materialises every tokenizer entry (about 10 s for a Llama-3 vocabulary on 2
cores).

Hyperparameters are read the way llama.cpp reads them (src/llama-model.cpp, src/models/*.cpp):
- `{arch}.attention.head_count_kv` may be a per-layer array; a 0 entry means the layer keeps no KV cache;
- head dims come from `{arch}.attention.key_length` / `value_length`, else n_embd / n_head;
- sliding-window attention: `{arch}.attention.sliding_window` is the window; which layers use it comes from
  `{arch}.attention.sliding_window_pattern` (a per-layer bool array, or a period), else the architecture's
  default period (gemma3: 6, i.e. every 6th layer is global; llama_hparams::set_swa_pattern).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import gguf
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType

from quantize.model.gguf_header import GGUFHeader, GGUFHeaderError, read_header
from quantize.model.spec import ModelSpec, TensorInfo

__all__ = ["GGUFReadError", "ModelSpec", "TensorInfo", "read_model_spec", "swa_layer_pattern"]

# Architectures whose llama.cpp model class turns on sliding-window attention, with the default period of the
# layer pattern (load_swa_pattern(ml, n) in src/models/<arch>.cpp), whether the dense layer comes first, and
# the window llama.cpp assumes when the GGUF has none (0: the key is required or SWA is off without it).
_SWA_ARCHS: dict[str, tuple[int, bool, int]] = {
    "gemma2": (2, False, 4096),
    "gemma3": (6, False, 0),
    "gemma-embedding": (6, False, 0),
    "gemma3n": (5, False, 0),
    "cohere2": (4, False, 0),
    "gpt-oss": (2, False, 0),
    "llama4": (4, False, 8192),
    "exaone4": (4, False, 0),
    "olmo2": (4, False, 0),
}


class GGUFReadError(ValueError):
    """The file is missing, not a GGUF, truncated, or lacks the keys a model needs; the message names it."""


def swa_layer_pattern(n_layer: int, period: int, dense_first: bool = False) -> tuple[bool, ...]:
    """Per-layer SWA flags as llama_hparams::set_swa_pattern computes them.

    period 0: every layer is SWA. dense_first=False: the last layer of each period is dense (gemma3: 5 local,
    1
    global); dense_first=True: the first layer of each period is dense.
    """
    if period == 0:
        return (True,) * n_layer
    if dense_first:
        return tuple(il % period != 0 for il in range(n_layer))
    return tuple(il % period < period - 1 for il in range(n_layer))


def _field(reader: GGUFHeader, key: str) -> Any:
    return reader.fields.get(key)


def _int_or_list(value: Any, n_layer: int, what: str, path: Path) -> tuple[int, ...]:
    if isinstance(value, list):
        if len(value) != n_layer:
            raise GGUFReadError(f"{path}: {what} has {len(value)} entries, expected {n_layer}")
        return tuple(int(v) for v in value)
    return (int(value),) * n_layer


def _file_type_name(ftype: int | None) -> str | None:
    if ftype is None:
        return None
    try:
        return LlamaFileType(ftype).name.removeprefix("MOSTLY_")
    except ValueError:
        return f"unknown({ftype})"


def _open(path: Path) -> GGUFHeader:
    if not path.exists():
        raise GGUFReadError(f"{path}: no such file")
    if not path.is_file():
        raise GGUFReadError(f"{path}: not a regular file")
    try:
        return read_header(path)
    except GGUFHeaderError as exc:
        raise GGUFReadError(f"{path}: {exc}") from exc
    except (OSError, ValueError) as exc:
        raise GGUFReadError(f"{path}: cannot read GGUF header ({type(exc).__name__}: {exc})") from exc


def _tensors(reader: GGUFHeader, path: Path) -> tuple[TensorInfo, ...]:
    out: list[TensorInfo] = []
    for t in reader.tensors:
        try:
            ttype = GGMLQuantizationType(t.type_id)
        except ValueError:
            raise GGUFReadError(f"{path}: tensor {t.name} has unknown ggml type {t.type_id}") from None
        block, type_size = GGML_QUANT_SIZES[ttype]
        n_elem = 1
        for d in t.dims:
            n_elem *= d
        n_bytes = n_elem // block * type_size
        if t.offset + n_bytes > reader.file_size:
            raise GGUFReadError(
                f"{path}: truncated: tensor {t.name} ends at byte {t.offset + n_bytes}, "
                f"the file has {reader.file_size}"
            )
        out.append(TensorInfo(name=t.name, shape=t.dims, ggml_type=ttype.name, n_bytes=n_bytes))
    return tuple(out)


def read_model_spec(path: str | os.PathLike[str]) -> ModelSpec:
    """Inspect a GGUF model file. Raises GGUFReadError (naming the file) instead of leaking parser errors."""
    p = Path(path)
    reader = _open(p)
    tensors = _tensors(reader, p)
    if not tensors:
        raise GGUFReadError(f"{p}: the GGUF has no tensors (a vocabulary-only file?), not a model")

    arch = _field(reader, gguf.Keys.General.ARCHITECTURE)
    if not isinstance(arch, str) or not arch:
        raise GGUFReadError(f"{p}: no general.architecture key; not a model GGUF")

    def key(template: str) -> str:
        return template.format(arch=arch)

    def need(template: str) -> Any:
        v = _field(reader, key(template))
        if v is None:
            raise GGUFReadError(f"{p}: missing key {key(template)}")
        return v

    n_layer = int(need(gguf.Keys.LLM.BLOCK_COUNT))
    if n_layer <= 0:
        raise GGUFReadError(f"{p}: {key(gguf.Keys.LLM.BLOCK_COUNT)} is {n_layer}")
    n_embd = int(need(gguf.Keys.LLM.EMBEDDING_LENGTH))
    n_head_all = _int_or_list(need(gguf.Keys.Attention.HEAD_COUNT), n_layer, "head_count", p)
    n_head = max(n_head_all)
    kv_raw = _field(reader, key(gguf.Keys.Attention.HEAD_COUNT_KV))
    n_head_kv = _int_or_list(kv_raw if kv_raw is not None else n_head, n_layer, "head_count_kv", p)

    hd_k = _field(reader, key(gguf.Keys.Attention.KEY_LENGTH))
    hd_v = _field(reader, key(gguf.Keys.Attention.VALUE_LENGTH))
    head_dim_k = int(hd_k) if hd_k else n_embd // n_head
    head_dim_v = int(hd_v) if hd_v else n_embd // n_head

    ff_raw = _field(reader, key(gguf.Keys.LLM.FEED_FORWARD_LENGTH))
    n_ff = max(_int_or_list(ff_raw, n_layer, "feed_forward_length", p)) if ff_raw is not None else 0

    n_vocab_raw = _field(reader, key(gguf.Keys.LLM.VOCAB_SIZE))
    if n_vocab_raw is None:
        n_vocab_raw = reader.array_len(gguf.Keys.Tokenizer.LIST)
    if n_vocab_raw is None:
        embd = next((t for t in tensors if t.name == "token_embd.weight"), None)
        n_vocab_raw = embd.shape[1] if embd is not None and len(embd.shape) > 1 else None
    if not n_vocab_raw:
        raise GGUFReadError(
            f"{p}: cannot tell the vocabulary size (no vocab_size, tokenizer list or token_embd)"
        )

    n_ctx_train = int(_field(reader, key(gguf.Keys.LLM.CONTEXT_LENGTH)) or 0)
    n_expert = int(_field(reader, key(gguf.Keys.LLM.EXPERT_COUNT)) or 0)

    sliding_window, swa_layers = _swa(reader, arch, n_layer, key)

    ftype_raw = _field(reader, gguf.Keys.General.FILE_TYPE)
    file_type = int(ftype_raw) if ftype_raw is not None else None

    try:
        return ModelSpec(
            path=str(p),
            source="gguf",
            architecture=arch,
            name=str(_field(reader, gguf.Keys.General.NAME) or p.stem),
            n_layer=n_layer,
            n_embd=n_embd,
            n_head=n_head,
            n_head_kv=n_head_kv,
            head_dim_k=head_dim_k,
            head_dim_v=head_dim_v,
            n_ff=n_ff,
            n_vocab=int(n_vocab_raw),
            n_ctx_train=n_ctx_train,
            n_expert=n_expert,
            sliding_window=sliding_window,
            swa_layers=swa_layers,
            file_type=file_type,
            file_type_name=_file_type_name(file_type),
            tensors=tensors,
            has_chat_template=gguf.Keys.Tokenizer.CHAT_TEMPLATE in reader.fields,
        )
    except ValueError as exc:
        raise GGUFReadError(f"{p}: inconsistent hyperparameters: {exc}") from exc


def _swa(reader: GGUFHeader, arch: str, n_layer: int, key: Any) -> tuple[int, tuple[bool, ...]]:
    if arch not in _SWA_ARCHS:
        # llama.cpp ignores a sliding_window key on architectures whose model class does not implement SWA.
        return 0, ()
    period, dense_first, default_window = _SWA_ARCHS[arch]
    window = _field(reader, key(gguf.Keys.Attention.SLIDING_WINDOW))
    n_swa = int(window) if window is not None else default_window
    if n_swa <= 0:
        return 0, ()
    pattern = _field(reader, key(gguf.Keys.Attention.SLIDING_WINDOW_PATTERN))
    if isinstance(pattern, list) and len(pattern) == n_layer:
        layers = tuple(bool(v) for v in pattern)
    else:
        layers = swa_layer_pattern(n_layer, int(pattern) if pattern is not None else period, dense_first)
    return (n_swa, layers) if any(layers) else (0, ())
