"""Values that cross the engine's boundary: what a request asks for and what comes back per step."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

FinishReason = Literal["stop", "length", "cancelled", "error"]


@dataclass(frozen=True)
class SamplingParams:
    """Per-sequence sampling settings (OpenAI / llama.cpp semantics). temperature 0 means greedy."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    # (token id, bias) pairs added to the logits before sampling; -inf bans a token.
    logit_bias: tuple[tuple[int, float], ...] = ()
    # A GBNF grammar (root rule "root") the output must follow: llama.cpp's grammar sampler, on the host.
    grammar: str | None = None
    # Speculative decoding for this request: None follows the server (spec_type), False turns it off, True
    # asks for it (refused where the server has none).
    speculative: bool | None = None

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if not 0 <= self.min_p <= 1:
            raise ValueError("min_p must be in [0, 1]")
        if self.grammar is not None and self.ignore_eos:
            # A finished grammar allows only the end-of-generation token, which ignore_eos bans.
            raise ValueError("ignore_eos cannot be combined with a grammar")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def sorts_vocabulary(self) -> bool:
        """Whether a host chain may have to order the whole vocabulary: top-p with no top-k in front (on a
        flat distribution llama.cpp's adaptive sort falls back to a full sort of 128k entries)."""
        return not self.is_greedy and self.top_k == 0 and self.top_p < 1.0


@dataclass(frozen=True)
class StreamEvent:
    """One engine step's output for one sequence. `text` is a complete-UTF-8 delta (may be empty).

    The last event of a sequence has `finish_reason` set; token counts are cumulative.
    """

    text: str
    token_ids: tuple[int, ...] = ()
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    logprobs: tuple[float, ...] = field(default=())
    # With SamplingParams.logprobs = n > 0: per token of this event, the n most likely (token id, logprob).
    top_logprobs: tuple[tuple[tuple[int, float], ...], ...] = field(default=())


@dataclass(frozen=True)
class Placement:
    """Where the engine really runs: what llama.cpp's build can use and what the loaded model got."""

    devices: tuple[str, ...]  # what this llama.cpp build computes on
    gpu_offload_supported: bool
    n_layer: int
    n_gpu_layers: int  # layers offloaded, the output layer counted as llama.cpp counts it (n_layer + 1 = all)
    output_on_gpu: bool
    kv_unified: bool

    @property
    def on_gpu(self) -> bool:
        return self.n_gpu_layers > 0

    def describe(self) -> str:
        if not self.on_gpu:
            why = "" if self.gpu_offload_supported else " (this llama.cpp build has no GPU support)"
            return f"the CPU{why}"
        return f"{self.n_gpu_layers} of {self.n_layer + 1} layers on the GPU ({', '.join(self.devices)})"
