"""llama.cpp's memory model (llama-server and the embedded engine), per device, as pure functions.

Every rule here is read from the llama.cpp sources that llama-cpp-python 0.3.36 vendors:
- context sizes (src/llama-context.cpp): n_ctx is padded to 256; without a unified KV cache each of the
  n_seq_max streams gets n_ctx_seq = PAD(n_ctx / n_seq_max, 256) cells and n_ctx becomes
  n_ctx_seq * n_seq_max; n_batch = min(n_ctx, n_batch), n_ubatch = min(n_batch, n_ubatch).
- KV cache (src/llama-kv-cache.cpp): per layer a K tensor [n_embd_k_gqa, kv_size, n_stream] and a V tensor
  [n_embd_v_gqa, kv_size, n_stream] in the device buffer of that layer. Sliding-window layers live in a
  second cache (src/llama-kv-cache-iswa.cpp) of
  PAD(min(n_ctx_seq, n_swa * (unified ? n_seq_max : 1) + n_ubatch), 256) cells unless swa_full
  (llama_context_default_params has swa_full = true; llama-server's default is false).
- a quantized V cache needs flash attention (llama_context constructor throws otherwise).
- placement (src/llama-model.cpp): token_embd on the CPU; layer il on device
  upper_bound(splits, il / (n_layer + 1)) with splits by free memory (equal cards: equal parts); the output
  layer on the device after the last layer.
- CUDA buffers (ggml/src/ggml-cuda/ggml-cuda.cu): quantized tensors whose ne0 is not a multiple of 512 get
  one extra padded row chunk (MATRIX_ROW_PADDING); allocations are aligned to 128 bytes.
- compute buffer: the graph allocator keeps the KQ mask inputs alive through every layer; the peak is the
  largest of a layer's attention step (without flash attention the f32 KQ [n_kv, n_ubatch, n_head]; with
  flash attention on CUDA an F16 copy of a quantized K and V view,
  ggml_cuda_flash_attn_ext_get_alloc_size), its FFN step (gate, up and the SwiGLU output, f32
  [n_ff, n_ubatch] each) and the output step (f32 logits [n_vocab, n_outputs]). llama-server reserves
  n_outputs_max = n_parallel (tools/server/server-context.cpp, server_output_limits), so its logits are
  small; llama_context_default_params leaves n_outputs_max = 0, i.e. n_batch rows.
- with several GPUs and full offload, llama.cpp enables pipeline parallelism: the scheduler keeps
  GGML_SCHED_MAX_COPIES (4) copies of each device's graph inputs.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from fractions import Fraction

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from quantize.model.spec import TOKEN_EMBD, ModelSpec, TensorInfo
from quantize.model.units import MIB

CTX_PAD = 256
CUDA_ALIGNMENT = 128
MATRIX_ROW_PADDING = 512
SCHED_MAX_COPIES = 4

# What nvidia-smi shows for an idle llama-server beyond its buffers: the CUDA context, which grows with the SM
# count (a bare context costs about 3 MiB per SM on 1536-thread SMs: 555 MiB on a 188-SM RTX PRO 6000, 107 MiB
# on a 34-SM RTX 4060 Ti, measured in ggml-org/llama.cpp PR 23604), i.e. about 2 KiB per resident thread, plus
# a base for cuBLAS, the kernels loaded so far and the CUDA memory pool after the warm-up decode. The base is
# calibrated with bench/memory_accuracy.py (see docs/BENCHMARKS.md).
CUDA_BASE_OVERHEAD_BYTES = 150 * MIB
CONTEXT_BYTES_PER_THREAD = 2048
CPU_OVERHEAD_BYTES = 64 * MIB


def ggml_type(name: str) -> GGMLQuantizationType:
    try:
        return GGMLQuantizationType[name.upper()]
    except KeyError:
        raise ValueError(f"unknown ggml type {name!r}") from None


def row_bytes(type_name: str, ne0: int) -> int:
    """ggml_row_size: bytes of one row of ne0 elements."""
    block, size = GGML_QUANT_SIZES[ggml_type(type_name)]
    if ne0 % block:
        raise ValueError(f"{type_name} needs rows that are a multiple of {block}, got {ne0}")
    return ne0 // block * size


def is_quantized(type_name: str) -> bool:
    return type_name.upper() not in ("F32", "F16", "BF16", "F64", "I8", "I16", "I32", "I64")


def pad(x: int, n: int) -> int:
    return (x + n - 1) // n * n


def cuda_alloc_bytes(type_name: str, shape: tuple[int, ...], n_bytes: int, *, is_cuda: bool) -> int:
    """Bytes a device buffer reserves for a tensor (ggml_backend_cuda_buffer_type_get_alloc_size, aligned)."""
    size = n_bytes
    if is_cuda and is_quantized(type_name) and shape and shape[0] % MATRIX_ROW_PADDING:
        # a label that is no ggml type (an HF checkpoint's FP8/INT4) gets no padding
        with contextlib.suppress(ValueError, KeyError):
            size += row_bytes(type_name, MATRIX_ROW_PADDING - shape[0] % MATRIX_ROW_PADDING)
    return pad(size, CUDA_ALIGNMENT if is_cuda else 32)


def cuda_overhead_bytes(sm_count: int | None, compute_capability: tuple[int, int]) -> int:
    """CUDA context + runtime memory of one llama.cpp process on one GPU."""
    threads_per_sm = {(7, 5): 1024, (8, 6): 1536, (8, 7): 1536, (8, 9): 1536, (12, 0): 1536}.get(
        compute_capability, 2048
    )
    return CUDA_BASE_OVERHEAD_BYTES + (sm_count or 40) * threads_per_sm * CONTEXT_BYTES_PER_THREAD


@dataclass(frozen=True)
class LlamaContextSizes:
    """The numbers llama_context derives from the user's settings."""

    n_ctx: int  # total cells over all sequences, after padding
    n_ctx_seq: int  # cells per stream (the base cache's kv_size)
    n_stream: int
    n_batch: int
    n_ubatch: int
    n_outputs: int  # rows of logits in the reserved graph
    swa_cells: int  # kv_size of the sliding-window cache (0: no SWA cache)


def context_sizes(
    spec: ModelSpec,
    n_ctx_total: int,
    n_parallel: int,
    *,
    n_batch: int,
    n_ubatch: int,
    kv_unified: bool,
    swa_full: bool,
    n_outputs_max: int,
) -> LlamaContextSizes:
    """llama.cpp's sizes for a context of `n_ctx_total` cells (cparams.n_ctx: all sequences together)."""
    if n_ctx_total <= 0 or n_parallel <= 0:
        raise ValueError(f"n_ctx_total and n_parallel must be positive (got {n_ctx_total}, {n_parallel})")
    batch = min(n_ctx_total, n_batch)
    ubatch = min(batch, n_ubatch)
    ctx = pad(n_ctx_total, CTX_PAD)
    if kv_unified:
        n_ctx_seq, n_stream = ctx, 1
    else:
        n_ctx_seq = pad(ctx // n_parallel, CTX_PAD)
        if n_ctx_seq == 0:
            raise ValueError("n_ctx_seq == 0: n_ctx is smaller than n_parallel")
        ctx, n_stream = n_ctx_seq * n_parallel, n_parallel
    tokens = min(ctx, ubatch)
    outputs = min(tokens, n_outputs_max if n_outputs_max > 0 else batch)
    swa_cells = 0
    if spec.has_swa:
        swa_cells = (
            n_ctx_seq
            if swa_full
            else pad(
                min(n_ctx_seq, spec.sliding_window * (n_parallel if kv_unified else 1) + ubatch), CTX_PAD
            )
        )
    return LlamaContextSizes(ctx, n_ctx_seq, n_stream, batch, tokens, outputs, swa_cells)


def layer_devices(n_layer: int, n_devices: int) -> list[int]:
    """Device of each repeating layer and, last, of the output layer (llama_model::load_tensors, equal
    splits)."""
    act = n_layer + 1
    splits = [Fraction(i + 1, n_devices) for i in range(n_devices)]
    out = []
    for il in range(n_layer + 1):
        x = Fraction(il, act)
        out.append(min(sum(1 for s in splits if s <= x), n_devices - 1))
    return out


def layer_kv_cells(spec: ModelSpec, sizes: LlamaContextSizes, il: int) -> int:
    """kv_size (per stream) of the cache holding layer il."""
    return sizes.swa_cells if spec.is_swa(il) else sizes.n_ctx_seq


def kv_layer_bytes(
    spec: ModelSpec,
    sizes: LlamaContextSizes,
    il: int,
    type_k: str,
    type_v: str,
    *,
    flash_attn: bool,
    is_cuda: bool,
) -> int:
    """K + V bytes of one layer as allocated (0 for a layer without KV heads)."""
    if spec.n_head_kv[il] == 0:
        return 0
    cells = layer_kv_cells(spec, sizes, il) * sizes.n_stream
    ne_k = spec.n_embd_k_gqa(il)
    # V is stored transposed without flash attention, sized for the widest layer ([TAG_V_CACHE_VARIABLE])
    ne_v = spec.n_embd_v_gqa(il) if flash_attn else max(spec.n_embd_v_gqa(i) for i in range(spec.n_layer))
    k = row_bytes(type_k, ne_k) * cells
    v = row_bytes(type_v, ne_v) * cells
    return cuda_alloc_bytes(type_k, (ne_k, cells), k, is_cuda=is_cuda) + cuda_alloc_bytes(
        type_v, (ne_v, cells), v, is_cuda=is_cuda
    )


def kv_bytes_formula(spec: ModelSpec, n_cells: int, bytes_k: float, bytes_v: float) -> float:
    """The textbook figure: cells * sum over layers n_head_kv * (hd_k * bytes_K + hd_v * bytes_V)."""
    return n_cells * sum(
        kv * (spec.head_dim_k * bytes_k + spec.head_dim_v * bytes_v) for kv in spec.n_head_kv
    )


def tensor_device_bytes(t: TensorInfo, *, is_cuda: bool) -> int:
    return cuda_alloc_bytes(t.ggml_type, t.shape, t.n_bytes, is_cuda=is_cuda)


def compute_bytes(
    spec: ModelSpec,
    sizes: LlamaContextSizes,
    layers: list[int],
    *,
    has_output: bool,
    type_k: str,
    type_v: str,
    flash_attn: bool,
    is_cuda: bool,
    n_copies: int = 1,
) -> int:
    """Peak of the graph allocator on one device for the worst-case (prompt) graph."""
    t = sizes.n_ubatch
    f32 = 4
    r = spec.n_embd * t * f32
    mask_elem = 2 if flash_attn else 4
    caches = {layer_kv_cells(spec, sizes, il) for il in layers if spec.n_head_kv[il] > 0}
    inputs = sum(n_kv * t * mask_elem for n_kv in caches) + r + 3 * t * 4
    peak_layer = 0
    for il in layers:
        hd_k, hd_v, n_head, n_kv_head = spec.head_dim_k, spec.head_dim_v, spec.n_head, spec.n_head_kv[il]
        q = n_head * hd_k * t * f32
        kv = n_kv_head * (hd_k + hd_v) * t * f32
        attn_out = n_head * hd_v * t * f32
        n_kv = layer_kv_cells(spec, sizes, il) * sizes.n_stream
        if flash_attn:
            extras = 0
            if is_cuda and is_quantized(type_k):
                extras += n_kv * spec.n_embd_k_gqa(il) * 2
            if is_cuda and is_quantized(type_v):
                extras += n_kv * spec.n_embd_v_gqa(il) * 2
            attn = r + q + kv + attn_out + extras
        else:
            kq = layer_kv_cells(spec, sizes, il) * t * n_head * f32
            attn = r + q + kv + kq + 2 * attn_out
        ffn = r + 3 * spec.n_ff * t * f32
        peak_layer = max(peak_layer, attn, ffn)
    peak = n_copies * inputs + peak_layer
    if has_output:
        out_rows = sizes.n_outputs
        peak = max(peak, r + spec.n_vocab * out_rows * f32 + spec.n_embd * out_rows * f32)
    return pad(peak, CUDA_ALIGNMENT)


def output_buffer_bytes(spec: ModelSpec, sizes: LlamaContextSizes, n_outputs_max: int) -> int:
    """Host buffer for the logits of one ubatch (llama_context::output_reserve)."""
    rows = n_outputs_max if n_outputs_max > 0 else sizes.n_batch
    return spec.n_vocab * rows * 4


@dataclass(frozen=True)
class DeviceShare:
    """What one device holds of a llama.cpp deployment (CUDA context not included)."""

    index: int
    layers: tuple[int, ...]  # first and last repeating layer, () for none
    has_output: bool
    weights_bytes: int
    kv_bytes: int
    compute_bytes: int


def device_shares(
    spec: ModelSpec,
    sizes: LlamaContextSizes,
    n_devices: int,
    kv_type: str,
    *,
    flash_attn: bool,
    is_cuda: bool,
    kv_ok: bool = True,
) -> list[DeviceShare]:
    """Weights, KV and compute per device with full offload and a layer split over equal devices."""
    dev_of = layer_devices(spec.n_layer, n_devices)
    copies = SCHED_MAX_COPIES if n_devices > 1 else 1
    embd = next((t for t in spec.tensors if t.name == TOKEN_EMBD), None)
    out = []
    for d in range(n_devices):
        layers = [il for il in range(spec.n_layer) if dev_of[il] == d]
        has_output = dev_of[spec.n_layer] == d
        weights = 0
        for t in spec.tensors:
            in_layer = t.layer is not None and t.layer < spec.n_layer and dev_of[t.layer] == d
            if in_layer or (t.layer is None and t.name != TOKEN_EMBD and has_output):
                weights += tensor_device_bytes(t, is_cuda=is_cuda)
        if has_output and spec.is_output_tied and embd is not None:
            weights += tensor_device_bytes(embd, is_cuda=is_cuda)  # the TENSOR_DUPLICATED output matrix
        kv = 0
        if kv_ok:
            kv = sum(
                kv_layer_bytes(spec, sizes, il, kv_type, kv_type, flash_attn=flash_attn, is_cuda=is_cuda)
                for il in layers
            )
        comp = compute_bytes(
            spec, sizes, layers, has_output=has_output, type_k=kv_type, type_v=kv_type,
            flash_attn=flash_attn, is_cuda=is_cuda, n_copies=copies,
        )  # fmt: skip
        span = (layers[0], layers[-1]) if layers else ()
        out.append(DeviceShare(d, span, has_output, weights, kv, comp))
    return out
