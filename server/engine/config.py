"""Engine settings and the engine's counters, as plain frozen values."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

# ggml type ids for the KV cache types llama-server accepts (--cache-type-k/-v).
KV_TYPES: dict[str, int] = {
    "f32": 0,
    "f16": 1,
    "q4_0": 2,
    "q4_1": 3,
    "q5_0": 6,
    "q5_1": 7,
    "q8_0": 8,
    "iq4_nl": 20,
    "bf16": 30,
}

# llama.cpp's LLAMA_MAX_SEQ: the most sequences one context can hold.
MAX_SEQUENCES = 256


@dataclass(frozen=True)
class EngineConfig:
    """How to load the model and size the context.

    `n_ctx` is the total KV cache in tokens, as llama-server's -c. With `kv_unified` the sequences share one
    pool, one of them may use all of it, a prefix can be shared between running sequences, and when they
    outgrow the pool together the newest is preempted; llama.cpp's attention kernels then see the whole step,
    so the last bits of a logit (and rarely a near-tie greedy token) depend on what else runs. Without it (as
    llama-server with -np) every sequence owns n_ctx / n_parallel cells and computes the same bits whatever
    else shares its step, but llama.cpp cuts a step that mixes decoding and prefilling sequences into many
    small pieces (one per equal share of every sequence): on an H200 with 64 streams and mixed prompt lengths,
    3x slower. None: unified where the output layer is on a GPU (speed), per sequence on the CPU (greedy
    output independent of the load). `n_batch` is the token budget of one engine step (one token per running
    sequence plus prefill chunks). `backend_sampling` runs each sequence's sampler chain inside llama.cpp's
    decode graph (None: on a GPU, only the chains that would sort the whole vocabulary on the host: top-p
    without top-k). `overlap` turns one step's tokens into text and events while the device computes the next
    (None: where the output layer is on a GPU; on the CPU it would only delay every event by a step).
    `flash_attn` None lets llama.cpp decide. `seed` is the sampling seed of requests that carry none (None:
    random). `cpu_extra_bufts` lets llama.cpp repack CPU weights for faster kernels (AMX among them); None
    turns it off only where the CPU lists AMX and llama.cpp was built with AMX kernels: some virtual machines
    list AMX tiles they cannot run (batched decode then dies with an illegal instruction).
    """

    model_path: str
    n_ctx: int = 8192
    n_parallel: int = 4
    n_batch: int = 512
    n_ubatch: int = 512
    n_threads: int | None = None
    n_threads_batch: int | None = None
    n_gpu_layers: int = 0
    flash_attn: bool | None = None
    kv_type: str = "f16"
    kv_unified: bool | None = None
    seed: int | None = None
    prefix_cache: bool = True
    backend_sampling: bool | None = None
    overlap: bool | None = None
    cpu_extra_bufts: bool | None = None
    verbose: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "model_path", str(self.model_path))
        if self.n_ctx < 16:
            raise ValueError("n_ctx must be at least 16 tokens")
        if not 1 <= self.n_parallel <= MAX_SEQUENCES:
            raise ValueError(f"n_parallel must be in [1, {MAX_SEQUENCES}]")
        if self.n_batch < self.n_parallel:
            raise ValueError("n_batch must be at least n_parallel: every running sequence decodes each step")
        if self.n_ubatch < 1 or self.n_ubatch > self.n_batch:
            raise ValueError("n_ubatch must be in [1, n_batch]")
        if self.kv_type not in KV_TYPES:
            raise ValueError(f"kv_type must be one of {', '.join(KV_TYPES)}")
        for name in ("n_threads", "n_threads_batch"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1")
        if not self.kv_unified and self.n_ctx // self.n_parallel < 16:
            raise ValueError("n_ctx / n_parallel must be at least 16 tokens without a unified KV cache")

    @property
    def threads(self) -> int:
        return self.n_threads or os.cpu_count() or 1

    @property
    def threads_batch(self) -> int:
        return self.n_threads_batch or self.threads

    @property
    def kv_ggml_type(self) -> int:
        return KV_TYPES[self.kv_type]


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine's state and counters (counters only grow).

    `kv_used_cells` are cells held by running sequences, `kv_cached_cells` cells kept by idle slots for prefix
    reuse (given back first when the cache runs short). Step figures: a step is one llama_decode; its tokens
    are one per decoding sequence plus prefill chunks; `max_step_seqs` > 1 means sequences shared steps.
    """

    is_ready: bool
    n_slots: int
    running: int
    waiting: int
    kv_used_cells: int
    kv_cached_cells: int
    kv_total_cells: int
    preemptions_total: int
    steps_total: int
    step_tokens_total: int
    last_step_tokens: int
    last_step_seqs: int
    max_step_tokens: int
    max_step_seqs: int
    prompt_tokens_total: int
    generated_tokens_total: int
    prefix_reused_tokens_total: int
    requests_finished_total: int
    requests_cancelled_total: int
    # tokens whose sampler chain ran inside llama.cpp's decode graph (the rest were sampled on the host)
    sampled_in_graph_total: int = 0
    # cumulative seconds of the decode thread per step phase (server.engine.step_profile.PHASES)
    step_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def kv_usage(self) -> float:
        """Share of the KV cache held by running sequences, 0..1."""
        return self.kv_used_cells / self.kv_total_cells if self.kv_total_cells else 0.0

    @property
    def mean_step_tokens(self) -> float:
        return self.step_tokens_total / self.steps_total if self.steps_total else 0.0
