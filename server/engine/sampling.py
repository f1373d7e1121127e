"""Per-sequence sampling with llama.cpp sampler chains, run inside llama.cpp's graph where the chain allows.

A chain bound to its sequence's slot (`llama_set_sampler`) is computed by llama.cpp as part of the decode
graph (on the GPU when the output layer is there): the step returns one sampled token per sequence and no
logits row is copied to the host or sorted on the CPU. Chains that need the raw logits (logprobs) run on
the host after the step, in C, without the GIL, and so do chains with a grammar: llama.cpp's grammar
sampler has no backend implementation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

import llama_cpp.llama_cpp as lc
import numpy as np

from server.engine.errors import InvalidGrammarError
from server.engine.types import SamplingParams

# llama-server's default --repeat-last-n: how many recent tokens the penalties look at.
PENALTY_LAST_N = 64
# Behind a grammar a ban is this bias, not -inf: should the grammar allow only banned tokens, one of them is
# picked instead of a token the grammar rejects (which llama.cpp answers by aborting the process).
GRAMMAR_BAN = -1.0e9


def _has_penalties(params: SamplingParams) -> bool:
    return params.repeat_penalty != 1.0 or params.frequency_penalty != 0.0 or params.presence_penalty != 0.0


class SamplerBinding(Protocol):
    """What the sampler needs from the context to run in llama.cpp's graph (LlamaRuntime implements it)."""

    def set_sampler(self, seq: int, chain: int | None) -> bool: ...


class Sampler:
    """A llama.cpp sampler chain built from SamplingParams, in llama-server's order.

    logit bias -> penalties -> top_k -> top_p -> min_p -> temperature -> dist(seed); temperature 0 ends in
    greedy (argmax, exact). With `ignore_eos`, a bias of -inf keeps end-of-generation tokens from being
    picked at all.

    `offload` asks for the chain to run in llama.cpp's graph once bound to a slot; a chain that needs the
    logits on the host (logprobs) never is. Where neither applies and the request is plain greedy, there is
    no chain: the engine takes the argmax of the logits row itself.
    """

    __slots__ = ("_chain", "_has_penalties", "_penalties_at", "_was_bound", "bound_slot", "can_offload",
                 "is_argmax", "seed")

    def __init__(self, params: SamplingParams, *, n_vocab: int, eog_tokens: Sequence[int] = (),
                 default_seed: int | None = None, offload: bool = False, vocab: int | None = None) -> None:
        self._has_penalties = _has_penalties(params)
        seed = params.seed if params.seed is not None else default_seed
        self.seed = lc.LLAMA_DEFAULT_SEED if seed is None else seed & 0xFFFFFFFF
        # A grammar sampler has no backend support: such a chain always stays on the host.
        self.can_offload = offload and params.logprobs is None and params.grammar is None
        self.bound_slot = -1
        self._was_bound = False
        # Plain greedy on the host needs no chain: numpy's argmax of the logits row (the first maximum, as
        # llama.cpp's greedy sampler) instead of llama.cpp copying the vocabulary into candidates per token.
        self.is_argmax = (params.is_greedy and not self._has_penalties and not params.logit_bias
                          and params.grammar is None and not self.can_offload)
        self._chain: int | None = None
        self._penalties_at = -1
        if not self.is_argmax:
            self._chain, self._penalties_at = _build_chain(params, n_vocab=n_vocab, eog_tokens=eog_tokens,
                                                           seed=self.seed, vocab=vocab)

    @property
    def is_bound(self) -> bool:
        return self.bound_slot >= 0

    def bind(self, binding: SamplerBinding, slot: int) -> bool:
        """Run this chain inside llama.cpp's graph for sequence `slot`. False when llama.cpp refused it."""
        if not self.can_offload or self._chain is None:
            return False
        if self._was_bound:
            # llama.cpp initialises a chain for one graph once: a chain bound before (this sequence was
            # preempted) goes on as a clone, which keeps its state (RNG, penalty history).
            fresh = lc.llama_sampler_clone(self._chain)
            lc.llama_sampler_free(self._chain)
            self._chain = fresh
        self._was_bound = True
        if not binding.set_sampler(slot, self._chain):
            self.can_offload = False
            return False
        self.bound_slot = slot
        return True

    def unbind(self, binding: SamplerBinding) -> None:
        """Take the chain out of llama.cpp's graph, before its slot serves another sequence or it is freed."""
        if self.bound_slot >= 0:
            binding.set_sampler(self.bound_slot, None)
            self.bound_slot = -1
            if self._chain is not None:
                # Unbound, this chain still skips its in-graph samplers: later host sampling uses a clone.
                fresh = lc.llama_sampler_clone(self._chain)
                lc.llama_sampler_free(self._chain)
                self._chain = fresh
                self._was_bound = False

    def accept_prompt(self, tokens: Sequence[int]) -> None:
        """Let the penalties (only them: a grammar must not see the prompt) see the end of the prompt, as
        llama-server does."""
        if self._penalties_at >= 0 and self._chain is not None:
            penalties = lc.llama_sampler_chain_get(self._chain, self._penalties_at)
            for tok in tokens[-PENALTY_LAST_N:]:
                lc.llama_sampler_accept(penalties, tok)

    def sample(self, ctx: int, idx: int) -> int:
        """The token for batch index `idx` of the last decode (sampled in the graph, or here), accepted."""
        return int(lc.llama_sampler_sample(self._chain, ctx, idx))

    def free(self) -> None:
        if self._chain is not None:
            lc.llama_sampler_free(self._chain)
            self._chain = None


def grammar_sampler(vocab: int, grammar: str) -> int:
    """llama.cpp's grammar sampler for `grammar` (root rule "root"); InvalidGrammarError when it does not
    parse (llama.cpp logs why)."""
    sampler = lc.llama_sampler_init_grammar(vocab, grammar.encode("utf-8"), b"root")
    if not sampler:
        raise InvalidGrammarError("the grammar does not parse (GBNF with a root rule named root)")
    return sampler  # type: ignore[no-any-return]


def check_grammar(vocab: int, grammar: str) -> None:
    """Raise InvalidGrammarError unless llama.cpp parses `grammar`."""
    lc.llama_sampler_free(grammar_sampler(vocab, grammar))


def _build_chain(params: SamplingParams, *, n_vocab: int, eog_tokens: Sequence[int], seed: int,
                 vocab: int | None) -> tuple[int, int]:
    """The chain and the place of its penalties sampler in it (-1: none)."""
    cparams = lc.llama_sampler_chain_default_params()
    cparams.no_perf = True
    chain = lc.llama_sampler_chain_init(cparams)
    if params.grammar is not None:
        if vocab is None:
            raise ValueError("a grammar needs the model's vocabulary")
        try:
            lc.llama_sampler_chain_add(chain, grammar_sampler(vocab, params.grammar))
        except InvalidGrammarError:
            lc.llama_sampler_free(chain)
            raise
    bias = _bias(params.logit_bias, eog_tokens if params.ignore_eos else ())
    if bias:
        if params.grammar is not None:
            bias = {t: max(b, GRAMMAR_BAN) for t, b in bias.items()}
        entries = (lc.llama_logit_bias * len(bias))(*[lc.llama_logit_bias(t, b) for t, b in bias.items()])
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_logit_bias(n_vocab, len(bias), entries))
    penalties_at = -1
    if _has_penalties(params):
        penalties_at = lc.llama_sampler_chain_n(chain)
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_penalties(
            n_vocab, PENALTY_LAST_N, params.repeat_penalty, params.frequency_penalty,
            params.presence_penalty))
    if params.is_greedy:
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_greedy())
        return chain, penalties_at
    if params.top_k > 0:
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_top_k(params.top_k))
    if params.top_p < 1.0:
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_top_p(params.top_p, 1))
    if params.min_p > 0.0:
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_min_p(params.min_p, 1))
    lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_temp(params.temperature))
    lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_dist(seed))
    return chain, penalties_at


def _bias(logit_bias: Sequence[tuple[int, float]], banned: Sequence[int]) -> dict[int, float]:
    """The request's logit bias, with the banned tokens at -inf."""
    out = {int(t): float(b) for t, b in logit_bias}
    for t in banned:
        out[int(t)] = -math.inf
    return out


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
