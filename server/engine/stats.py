"""The engine's state and counters at one moment, as one frozen value (the core sends it to the front)."""

from __future__ import annotations

from dataclasses import dataclass, field


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
    # CPU threads the steps run with now (they follow the free cores unless n_threads was given)
    n_threads: int = 0
    # sequence-steps that produced tokens (one per sequence per step, however many tokens it got)
    seq_steps_total: int = 0
    # speculative decoding: draft tokens verified, those the target accepted, sequence-steps that verified a
    # draft, steps where the batch was too large for anyone to draft
    spec_drafted_total: int = 0
    spec_accepted_total: int = 0
    spec_verified_total: int = 0
    spec_skipped_steps_total: int = 0

    @property
    def kv_usage(self) -> float:
        """Share of the KV cache held by running sequences, 0..1."""
        return self.kv_used_cells / self.kv_total_cells if self.kv_total_cells else 0.0

    @property
    def spec_acceptance(self) -> float:
        """Share of the drafted tokens the target accepted, 0..1."""
        return self.spec_accepted_total / self.spec_drafted_total if self.spec_drafted_total else 0.0

    @property
    def tokens_per_seq_step(self) -> float:
        """Generated tokens per sequence per step: 1 without speculation, more as drafts are accepted."""
        return self.generated_tokens_total / self.seq_steps_total if self.seq_steps_total else 0.0

    @property
    def mean_step_tokens(self) -> float:
        return self.step_tokens_total / self.steps_total if self.steps_total else 0.0
