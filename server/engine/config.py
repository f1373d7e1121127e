"""The engine's settings as one frozen value, validated once, and the rules its defaults follow.

`EngineConfig` is the one description of the engine's settings, validated here and nowhere else
downstream: `edgeserve serve` has one option per field under the field's name, the gateway's settings nest it
(environment EDGESERVE_ENGINE__<FIELD>), the fallback chain's members extend it, and the embedded launcher
renders `serve`'s argv from its fields. `n_ctx` is the context of ONE sequence, as everywhere in
edgeserve; the KV pool is n_ctx * n_parallel cells.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from quantize.model.kv_types import LLAMA_KV_TYPES, flash_attn_needed, kv_ggml_type, needs_flash_attn

# llama.cpp's LLAMA_MAX_SEQ: the most sequences one context can hold.
MAX_SEQUENCES = 256
# On a GPU, a request that arrives while fewer than this many run samples inside llama.cpp's decode graph,
# one that arrives beside more on the host (EngineConfig.sample_in_graph).
GRAPH_SAMPLING_BELOW = 16
# The one lower bound of a sequence's context, wherever an n_ctx enters (CLI, profile, chain, engine).
MIN_N_CTX = 16

FlashAttn = Literal["on", "off", "auto"]
# llama.cpp's pooling for /v1/embeddings; none: no embeddings (OpenAI's answer is one vector per input).
Pooling = Literal["mean", "cls", "last", "none"]
CoreMode = Literal["process", "thread"]
# llama-server's --spec-type names for what the engine implements: prompt lookup (n-grams of the prompt and
# the text so far) and a smaller draft model with the same vocabulary.
SpecType = Literal["none", "ngram-simple", "draft-simple"]
# Decoding sequences above which no sequence drafts (EngineConfig.spec_seq_limit): measured on the CPU
# (docs/BENCHMARKS.md, speculative decoding); on a GPU not yet measured, chosen so 32 streams never speculate.
SPEC_SEQS_CPU = 4
SPEC_SEQS_GPU = 8
# What one more token costs in a one-sequence step, relative to the step (EngineConfig.spec_token_cost_on):
# on the CPU measured with the bundled SmolLM2 on 2 vCPUs (13.5 ms for one token, 22.5 ms for two: the
# kernels are compute-bound); on a GPU, where decoding reads the weights once per step, not yet measured.
SPEC_TOKEN_COST_CPU = 0.65
SPEC_TOKEN_COST_GPU = 0.05
NCtx = Annotated[
    int, Field(ge=MIN_N_CTX, description="context of ONE sequence (prompt + completion), tokens")
]


def cap_n_ctx(n_ctx: int, n_ctx_train: int | None) -> int:
    """The one cap at the model's training context (0 or None: the model does not say)."""
    return min(n_ctx, n_ctx_train) if n_ctx_train else n_ctx


def default_kv_unified(n_parallel: int, output_on_gpu: bool) -> bool:
    """The engine's kv_unified when none is given: one pool wherever there are several sequences, on the CPU
    and on a GPU (EngineConfig's docstring says why). The one home of the rule: the launch plan asks it
    too."""
    del output_on_gpu  # measured the same way on both
    return n_parallel > 1


class EngineConfig(BaseModel):
    """How to load the model and size the context.

    Without `kv_unified` (as llama-server with -np) every sequence owns its n_ctx cells and computes the same
    bits whatever else shares its step, so greedy output does not depend on the load; but llama.cpp cuts a
    step that mixes decoding and prefilling sequences into pieces that take an equal share of each, and with
    many streams and mixed prompt lengths such steps come apart into many pieces. With `kv_unified` the
    sequences share one pool of the same size: such a step goes in whole, a prefix can be shared between
    running sequences (and the newest is preempted should they ever outgrow the pool together); but
    llama.cpp's attention kernels then see the whole step, so the last bits of a logit (and rarely a near-tie
    greedy token) depend on what else runs. `backend_sampling` runs sampler chains inside llama.cpp's decode
    graph instead of on the host after the step. Left None: one pool at any slot count, as measured on mixed
    traffic (prompts of 30-1,500 tokens, every request its own sampling, chat and completions: 32 slots with
    a cache per sequence made 0.41x of 64 pooled slots at 32 streams on an H100, issue 19; the CPU's own
    figures in docs/BENCHMARKS.md). Where a GPU samples is chosen from the in-process runs of 2026-11-29 and
    not yet measured on mixed traffic with the core in its own process: the chain of a request that arrives
    beside few others runs in the graph (one stream: no logits row to copy and sort), beside many on the host
    (at 64 pooled streams host chains were 1.3-1.5x faster: a graph with dozens of chains is rebuilt as they
    come and go); a chain that would sort the whole vocabulary (top-p without top-k) always runs in the graph.
    On the CPU sampling stays on the host.
    `overlap` turns a step's tokens into text and events while the device
    computes the next; None: where the output layer is on a GPU (on the CPU it only delays each event by a
    step). `cpu_extra_bufts` None turns llama.cpp's CPU weight repacking off only where the CPU lists AMX and
    llama.cpp was built with AMX kernels (some virtual machines list AMX tiles they cannot run).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    model_path: str | None = Field(default=None, description="GGUF file (default: the bundled SmolLM2-135M)")
    n_ctx: NCtx = 2048
    n_parallel: int = Field(
        default=4, ge=1, le=MAX_SEQUENCES, description="sequences decoded together (slots)"
    )
    n_batch: int = Field(
        default=512, ge=1, description="tokens per engine step: one per running sequence plus prefill chunks"
    )
    n_ubatch: int = Field(
        default=512, ge=1, validate_default=True, description="physical batch of one llama_decode"
    )
    n_threads: int | None = Field(
        default=None, ge=1,
        description="CPU threads (default: one per usable CPU, fewer while other processes take cores)")
    n_threads_batch: int | None = Field(
        default=None, ge=1, description="threads for prompts (default: n_threads)"
    )
    n_gpu_layers: int = Field(default=-1, ge=-1, description="layers on the GPU, -1 = all")
    flash_attn: FlashAttn = Field(default="auto", description="flash attention (auto: llama.cpp decides)")
    kv_type: str = Field(default="f16", description=f"KV cache type: {', '.join(LLAMA_KV_TYPES)}")
    kv_unified: bool | None = Field(
        default=None, description="one KV pool for all sequences (default: on with several slots)"
    )
    prefix_cache: bool = Field(default=True, description="reuse a finished sequence's prompt cells")
    seed: int | None = Field(
        default=None, description="sampling seed of requests that carry none (default: random)"
    )
    cpu_extra_bufts: bool | None = Field(
        default=None, description="llama.cpp's CPU weight repacking (default: off only where AMX could fault)"
    )
    backend_sampling: bool | None = Field(
        default=None,
        description=f"sampler chains inside llama.cpp's decode graph (default: on a GPU, for requests that "
        f"arrive beside fewer than {GRAPH_SAMPLING_BELOW} others, and chains with top-p but no top-k)",
    )
    overlap: bool | None = Field(
        default=None,
        description="make one step's events while the next step computes (default: where the output is on "
        "a GPU)",
    )
    force: bool = Field(
        default=False, description="start even where the memory check says the settings do not fit"
    )
    pooling: Pooling = Field(
        default="mean",
        description="how /v1/embeddings pools token vectors: mean, cls, last, or none (no embeddings)",
    )
    verbose: bool = Field(default=False, description="llama.cpp's own log on stderr")
    kv_cells_override: int | None = Field(
        default=None, ge=1,
        description="schedule as if the KV pool held only this many cells (vLLM's num_gpu_blocks_override: "
        "a smaller budget than llama.cpp's cache, to exercise preemption in tests)",
    )
    spec_type: SpecType = Field(
        default="none",
        description="speculative decoding: ngram-simple (drafts from the prompt and the text so far), "
        "draft-simple (a draft model, spec_draft_model), none; a request may turn it off "
        "(speculative: false)",
    )
    spec_draft_n_max: int = Field(
        default=8, ge=1, le=32, description="most tokens one sequence drafts per step (adapts to acceptance)"
    )
    spec_draft_n_min: int = Field(
        default=1, ge=1, description="fewest draft tokens worth verifying (shorter drafts are dropped)"
    )
    spec_draft_model: str | None = Field(
        default=None, description="GGUF of the draft model for draft-simple (same vocabulary as the model)"
    )
    spec_ngram_simple_size_n: int = Field(
        default=3, ge=1, le=16,
        description="ngram-simple: length of the n-gram looked up (shorter ones down to 2 are tried next)",
    )
    spec_seqs_max: int | None = Field(
        default=None, ge=0,
        description=f"decoding sequences above which no sequence drafts (default: {SPEC_SEQS_CPU} on the "
        f"CPU, {SPEC_SEQS_GPU} on a GPU)",
    )
    spec_token_cost: float | None = Field(
        default=None, ge=0.0, le=1.0,
        description=f"cost of one more token in a one-sequence step, relative to the step; draft lengths "
        f"follow it (default: {SPEC_TOKEN_COST_CPU} on the CPU, {SPEC_TOKEN_COST_GPU} on a GPU)",
    )
    spec_accept_min: float = Field(
        default=0.3, ge=0.0, le=1.0,
        description="acceptance ratio below which a sequence stops drafting for a while",
    )
    core: CoreMode = Field(
        default="process",
        description="where the engine core (the step loop that owns llama.cpp) runs: a process of its own, "
        "or a thread of the gateway's (for tests)",
    )

    @field_validator("n_ubatch")
    @classmethod
    def _ubatch_within_batch(cls, value: int, info: ValidationInfo) -> int:
        # As llama.cpp: the physical batch never exceeds the logical one (n_ubatch = min(n_batch, n_ubatch)).
        n_batch = info.data.get("n_batch")
        return min(value, n_batch) if n_batch is not None else value

    @model_validator(mode="after")
    def _check(self) -> EngineConfig:
        if self.n_batch < self.n_parallel:
            raise ValueError("n_batch must be at least n_parallel: every running sequence decodes each step")
        if self.kv_type not in LLAMA_KV_TYPES:
            raise ValueError(f"kv_type must be one of {', '.join(LLAMA_KV_TYPES)}")
        if needs_flash_attn(self.kv_type) and self.flash_attn == "off":
            raise ValueError(f"{flash_attn_needed(self.kv_type)}: flash_attn on or auto")
        if self.spec_type == "draft-simple" and not self.spec_draft_model:
            raise ValueError("spec_type draft-simple needs spec_draft_model (a GGUF, the same vocabulary)")
        if self.spec_draft_n_min > self.spec_draft_n_max:
            raise ValueError("spec_draft_n_min must not exceed spec_draft_n_max")
        return self

    @property
    def speculates(self) -> bool:
        return self.spec_type != "none"

    def spec_token_cost_on(self, output_on_gpu: bool) -> float:
        """spec_token_cost as given, else the measured (CPU) or chosen (GPU) default."""
        if self.spec_token_cost is not None:
            return self.spec_token_cost
        return SPEC_TOKEN_COST_GPU if output_on_gpu else SPEC_TOKEN_COST_CPU

    def spec_seq_limit(self, output_on_gpu: bool) -> int:
        """spec_seqs_max as given, else the measured (CPU) or chosen (GPU) default."""
        if self.spec_seqs_max is not None:
            return self.spec_seqs_max
        return SPEC_SEQS_GPU if output_on_gpu else SPEC_SEQS_CPU

    def unified_on(self, output_on_gpu: bool) -> bool:
        """kv_unified as given, else what was measured fastest for this device and slot count."""
        if self.kv_unified is not None:
            return self.kv_unified
        return default_kv_unified(self.n_parallel, output_on_gpu)

    def sample_in_graph(self, output_on_gpu: bool, sorts_vocabulary: bool, n_active: int) -> bool:
        """backend_sampling as given, else whether a request that arrives while `n_active` requests run or
        wait samples inside llama.cpp's decode graph: on a GPU, beside few (fewer than GRAPH_SAMPLING_BELOW)
        or when its chain would sort the whole vocabulary (`sorts_vocabulary`: SamplingParams' own)."""
        if self.backend_sampling is not None:
            return self.backend_sampling
        if not output_on_gpu:
            return False
        return sorts_vocabulary or n_active < GRAPH_SAMPLING_BELOW

    @property
    def n_ctx_total(self) -> int:
        """The KV pool in tokens: what llama.cpp's cparams.n_ctx gets."""
        return self.n_ctx * self.n_parallel

    @property
    def threads(self) -> int:
        return self.n_threads or os.cpu_count() or 1

    @property
    def threads_batch(self) -> int:
        return self.n_threads_batch or self.threads

    @property
    def kv_ggml_type(self) -> int:
        return kv_ggml_type(self.kv_type)

    def model_file(self) -> Path:
        """The GGUF to load: model_path, or the bundled model (BundledModelMissingError without it)."""
        from quantize.bundled import resolve_model_path

        return resolve_model_path(self.model_path)
