"""Per-sequence sampling with llama.cpp sampler chains (the sampling itself runs in C, without the GIL)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import llama_cpp.llama_cpp as lc
import numpy as np

from server.engine.types import SamplingParams

# llama-server's default --repeat-last-n: how many recent tokens the penalties look at.
PENALTY_LAST_N = 64


def _has_penalties(params: SamplingParams) -> bool:
    return params.repeat_penalty != 1.0 or params.frequency_penalty != 0.0 or params.presence_penalty != 0.0


class Sampler:
    """A llama.cpp sampler chain built from SamplingParams, in llama-server's order.

    penalties -> top_k -> top_p -> min_p -> temperature -> dist(seed); temperature 0 ends in greedy (argmax,
    exact). With `ignore_eos`, a logit bias of -inf keeps end-of-generation tokens from being picked at all.
    """

    __slots__ = ("_chain", "_has_penalties", "is_argmax", "seed")

    def __init__(self, params: SamplingParams, *, n_vocab: int, eog_tokens: Sequence[int] = (),
                 default_seed: int | None = None) -> None:
        self._has_penalties = _has_penalties(params)
        seed = params.seed if params.seed is not None else default_seed
        self.seed = lc.LLAMA_DEFAULT_SEED if seed is None else seed & 0xFFFFFFFF
        # Plain greedy needs no chain: the engine takes the argmax of the logits row itself (numpy, first
        # maximum like llama.cpp's greedy sampler) instead of having llama.cpp copy the vocabulary per token.
        self.is_argmax = params.is_greedy and not self._has_penalties
        self._chain = None
        if self.is_argmax:
            return
        cparams = lc.llama_sampler_chain_default_params()
        cparams.no_perf = True
        chain = lc.llama_sampler_chain_init(cparams)
        self._chain = chain
        if params.ignore_eos and eog_tokens:
            bias = (lc.llama_logit_bias * len(eog_tokens))(
                *[lc.llama_logit_bias(tok, -math.inf) for tok in eog_tokens])
            lc.llama_sampler_chain_add(
                chain, lc.llama_sampler_init_logit_bias(n_vocab, len(eog_tokens), bias))
        if self._has_penalties:
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_penalties(
                n_vocab, PENALTY_LAST_N, params.repeat_penalty, params.frequency_penalty,
                params.presence_penalty))
        if params.is_greedy:
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_greedy())
            return
        if params.top_k > 0:
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_top_k(params.top_k))
        if params.top_p < 1.0:
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_top_p(params.top_p, 1))
        if params.min_p > 0.0:
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_min_p(params.min_p, 1))
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_temp(params.temperature))
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_dist(self.seed))

    def accept_prompt(self, tokens: Sequence[int]) -> None:
        """Let the penalties see the end of the prompt, as llama-server does."""
        if self._has_penalties:
            for tok in tokens[-PENALTY_LAST_N:]:
                lc.llama_sampler_accept(self._chain, tok)

    def sample(self, ctx: int, idx: int) -> int:
        """Sample (and accept) a token from the logits of batch index `idx` of the last decode."""
        return int(lc.llama_sampler_sample(self._chain, ctx, idx))

    def free(self) -> None:
        if self._chain is not None:
            lc.llama_sampler_free(self._chain)
            self._chain = None


def token_logprobs(row: np.ndarray, token: int, top_n: int) -> tuple[float, tuple[tuple[int, float], ...]]:
    """log-softmax of a logits row at `token`, and the `top_n` most likely tokens with theirs."""
    n_vocab = row.shape[0]
    peak = float(row.max())
    log_z = peak + math.log(float(np.exp(row - peak, dtype=np.float64).sum()))
    chosen = float(row[token]) - log_z
    if top_n <= 0:
        return chosen, ()
    top_n = min(top_n, n_vocab)
    idx = np.argpartition(row, -top_n)[-top_n:]
    idx = idx[np.argsort(-row[idx], kind="stable")]
    return chosen, tuple((int(i), float(row[i]) - log_z) for i in idx)
