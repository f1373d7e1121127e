"""SGLang's memory model, as pure functions (sglang 0.5.23: srt/arg_groups/memory_hook.py, model_runner).

- `mem_fraction_static` = (weights + KV pool) / the GPU memory free at start-up; activations and CUDA-graph
  buffers live outside it. SGLang's own default (memory_hook._handle_gpu_memory_settings), in MiB of total
  GPU memory: reserved = 512 + max(chunked_prefill_size, 2048) * 1.5 + tp * pp / 8 * 1024
  + decode graph max_bs * 2 + 8 per captured prefill graph size (reserve_for_graph_mb), at least 10 GiB on
  cards above 60 GiB; fraction = round((gpu_mem - reserved) / gpu_mem, 3). chunked_prefill_size and the
  decode graph max_bs default by memory: < 20 GiB: 2048 / 8; < 35 GiB: 4096 / 48 (160 from TP 4);
  < 60 GiB: 4096 / 32 (160); < 160 GiB: 8192 / 256 (512); above: 16384 / 512; max_bs is capped by
  --max-running-requests.
- KV pool (ModelRunner.profile_max_num_token): rest = free_after_weights - free_at_start * (1 - fraction);
  max_total_num_tokens = rest // cell, cell = max(1, n_kv_heads // tp) * head_dim * n_layer * 2 * element
  size (2 bytes for auto = bf16/fp16 models, 1 for fp8_e5m2 / fp8_e4m3).
"""

from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict, Field

from quantize.model.kv_types import SGLANG_KV_TYPES
from quantize.model.spec import ModelSpec
from quantize.model.units import MIB

# torch's CUDA context and allocator state before the weights load; NCCL adds buffers with TP > 1.
TORCH_CONTEXT_BYTES = 600 * MIB
NCCL_BYTES_PER_PEER = 256 * MIB
SGLANG_METADATA_BYTES = 512 * MIB


class SglangSettings(BaseModel):
    """What `edgeserve launch --backend sglang` passes, and the pool it implies, under edgeserve's names:
    mem_fraction = --mem-fraction-static, kv_type = --kv-cache-dtype, n_ctx = --context-length (one
    sequence), n_parallel = --max-running-requests; kv_pool_tokens is the pool the fraction leaves (SGLang's
    max_total_num_tokens)."""

    model_config = ConfigDict(frozen=True)

    tp_size: int = Field(ge=1)
    mem_fraction: float = Field(gt=0, lt=1)
    sglang_default_mem_fraction: float
    chunked_prefill_size: int
    cuda_graph_max_bs: int
    kv_type: str
    n_ctx: int = Field(ge=1, description="context of one sequence")
    n_parallel: int = Field(ge=1)
    kv_pool_tokens: int = Field(description="KV pool size in tokens (SGLang's max_total_num_tokens)")
    kv_cell_bytes: int
    free_at_start_bytes: int
    kv_pool_bytes: int
    reserved_bytes: int = Field(description="activations + CUDA graphs outside the fraction")


def default_chunk_and_graph_bs(gpu_mem_mib: float, tp: int) -> tuple[int, int]:
    if gpu_mem_mib < 20 * 1024:
        return 2048, 8
    if gpu_mem_mib < 35 * 1024:
        return 4096, 48 if tp < 4 else 160
    if gpu_mem_mib < 60 * 1024:
        return 4096, 32 if tp < 4 else 160
    if gpu_mem_mib < 160 * 1024:
        return 8192, 256 if tp < 4 else 512
    return 16384, 512


def prefill_graph_sizes(max_bs: int) -> list[int]:
    """cuda_graph_hook.generate_prefill_cuda_graph_batch_sizes (prefill graphs are on by default on CUDA)."""
    sizes = (
        list(range(4, 33, 4))
        + list(range(48, 257, 16))
        + list(range(288, 513, 32))
        + list(range(576, 1025, 64))
        + list(range(1280, 4097, 256))
        + list(range(4608, max_bs + 1, 512))
    )
    return [s for s in sizes if s <= max_bs]


def reserved_mib(gpu_mem_mib: float, chunked_prefill_size: int, cuda_graph_max_bs: int, tp: int) -> float:
    """SGLang's estimate of activations + CUDA graphs + metadata, MiB."""
    reserved = 512 + max(chunked_prefill_size, 2048) * 1.5 + tp / 8 * 1024
    reserved += cuda_graph_max_bs * 2 + len(prefill_graph_sizes(chunked_prefill_size)) * 8
    if gpu_mem_mib > 60 * 1024:
        reserved = max(reserved, 10 * 1024)
    return reserved


def sglang_default_fraction(
    gpu_mem_bytes: int,
    tp: int,
    chunked_prefill_size: int | None = None,
    cuda_graph_max_bs: int | None = None,
    n_parallel: int | None = None,
) -> float:
    mib = gpu_mem_bytes / MIB
    chunk, bs = default_chunk_and_graph_bs(mib, tp)
    chunk = chunked_prefill_size or chunk
    if cuda_graph_max_bs:
        bs = cuda_graph_max_bs
    elif n_parallel:
        bs = min(bs, n_parallel)
    return round((mib - reserved_mib(mib, chunk, bs, tp)) / mib, 3)


def kv_element_bytes(kv_type: str, spec: ModelSpec) -> int:
    if kv_type not in SGLANG_KV_TYPES:
        raise ValueError(
            f"SGLang kv cache dtype must be one of {', '.join(SGLANG_KV_TYPES)}, got {kv_type!r}"
        )
    if kv_type == "auto" and spec.file_type_name in ("F32", "ALL_F32"):
        return 4  # auto keeps the model's own dtype
    return int(SGLANG_KV_TYPES[kv_type])


def kv_cell_bytes(spec: ModelSpec, tp: int, kv_type: str) -> int:
    """Bytes of one token in SGLang's KV pool on one GPU (every layer keeps a full cache)."""
    heads = max(1, max(spec.n_head_kv) // tp)
    return heads * (spec.head_dim_k + spec.head_dim_v) * spec.n_layer * kv_element_bytes(kv_type, spec)


def context_overhead_bytes(tp: int) -> int:
    return TORCH_CONTEXT_BYTES + (NCCL_BYTES_PER_PEER * (tp - 1) if tp > 1 else 0)


def weights_per_gpu(spec: ModelSpec, tp: int) -> int:
    """Tensor parallelism splits every matrix (embeddings and lm_head are vocab-parallel); norms replicate."""
    split = sum(t.n_bytes for t in spec.tensors if len(t.shape) > 1)
    replicated = spec.weights_bytes - split
    return split // tp + replicated


def sglang_settings(
    memory_bytes_per_gpu: int,
    spec: ModelSpec,
    *,
    tp: int = 1,
    n_ctx: int,
    n_parallel: int = 1,
    kv_type: str = "auto",
    mem_fraction: float | None = None,
    chunked_prefill_size: int | None = None,
    cuda_graph_max_bs: int | None = None,
    headroom_fraction: float = 0.05,
) -> SglangSettings:
    """Pick --mem-fraction-static for a card and derive the KV pool.

    By default the fraction is the largest that keeps context + weights + pool + SGLang's own activation/graph
    reserve within memory * (1 - headroom_fraction), and never above SGLang's default: small cards keep at
    least 512 MiB free for fragmentation and a desktop. `n_ctx` is the context of one of the `n_parallel`
    requests.
    """
    mem_mib = memory_bytes_per_gpu / MIB
    d_chunk, d_bs = default_chunk_and_graph_bs(mem_mib, tp)
    chunk = chunked_prefill_size or d_chunk
    # --max-running-requests caps the default decode graph batch (memory_hook)
    bs = cuda_graph_max_bs or min(d_bs, n_parallel)
    default_frac = sglang_default_fraction(memory_bytes_per_gpu, tp, chunk, bs)
    free_at_start = memory_bytes_per_gpu - context_overhead_bytes(tp)
    reserved = int(reserved_mib(mem_mib, chunk, bs, tp) * MIB)
    usable = min(memory_bytes_per_gpu * (1 - headroom_fraction), memory_bytes_per_gpu - 512 * MIB)
    if mem_fraction is None:
        fitted = (usable - context_overhead_bytes(tp) - reserved) / free_at_start
        frac = min(default_frac, math.floor(fitted * 1000) / 1000)
    else:
        frac = mem_fraction
    if not 0 < frac < 1:
        raise ValueError(
            f"mem_fraction must be in (0, 1), got {frac}: the card is too small for SGLang's reserve"
        )
    cell = kv_cell_bytes(spec, tp, kv_type)
    pool = int(free_at_start * frac) - weights_per_gpu(spec, tp)
    tokens = max(0, pool // cell)
    return SglangSettings(
        tp_size=tp,
        mem_fraction=frac,
        sglang_default_mem_fraction=default_frac,
        chunked_prefill_size=chunk,
        cuda_graph_max_bs=bs,
        kv_type=kv_type,
        n_ctx=n_ctx,
        n_parallel=n_parallel,
        kv_pool_tokens=tokens,
        kv_cell_bytes=cell,
        free_at_start_bytes=free_at_start,
        kv_pool_bytes=tokens * cell,
        reserved_bytes=reserved,
    )
