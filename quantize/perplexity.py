"""Perplexity on a text with llama.cpp's logits, computed the way llama-perplexity computes it.

tools/perplexity/perplexity.cpp: the text is tokenized once (with BOS when the model adds one), cut into
chunks of n_ctx tokens; each chunk is decoded from an empty cache with its first token replaced by BOS, and
only the second half of each window is scored (tokens n_ctx/2+1 .. n_ctx-1, each predicted from the logits of
the token before it), so that every scored token sees at least n_ctx/2 tokens of context.
PPL = exp(mean negative log-likelihood over the scored tokens).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from quantize.llama_session import LlamaSession


class EvalTextTooShortError(ValueError):
    """The evaluation text has fewer than two windows of tokens."""


@dataclass(frozen=True)
class Perplexity:
    """Perplexity over `n_scored` tokens in `n_chunks` windows of `n_ctx` tokens."""

    ppl: float
    nll_mean: float
    n_ctx: int
    n_chunks: int
    n_scored: int
    n_text_tokens: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        """Prompt-processing speed: evaluated tokens per second."""
        return self.n_chunks * self.n_ctx / self.seconds if self.seconds > 0 else 0.0


def _nll_of(logits: np.ndarray[Any, Any], targets: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """-log softmax(logits)[target] per row, in float64 for a stable log-sum-exp."""
    x = logits.astype(np.float64)
    m = x.max(axis=1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(x - m).sum(axis=1))
    return lse - x[np.arange(len(targets)), targets]


def perplexity(
    session: LlamaSession, text: str, *, n_ctx: int | None = None, max_tokens: int | None = None
) -> Perplexity:
    """Perplexity of `text` under the session's model. `max_tokens` caps the tokens used (whole windows)."""
    n_ctx = n_ctx or session.n_ctx
    if n_ctx > session.n_ctx:
        raise ValueError(f"window {n_ctx} is larger than the session's context {session.n_ctx}")
    if n_ctx < 8:
        raise ValueError(f"window {n_ctx} is too small to score anything")
    tokens = session.tokenize(text, add_special=True)
    n_text = len(tokens)
    if max_tokens is not None:
        tokens = tokens[:max_tokens]
    n_chunks = len(tokens) // n_ctx
    if n_chunks < 1:
        raise EvalTextTooShortError(
            f"the text gives {len(tokens)} tokens; a window of {n_ctx} needs at least {n_ctx}"
        )
    bos = session.bos
    first = n_ctx // 2
    nll_sum = 0.0
    n_scored = 0
    t0 = time.perf_counter()
    for c in range(n_chunks):
        chunk = tokens[c * n_ctx : (c + 1) * n_ctx]
        if bos is not None:
            chunk = [bos, *chunk[1:]]
        session.clear()
        # logits of positions first .. n_ctx-2 predict tokens first+1 .. n_ctx-1
        logits = session.decode(chunk, 0, first)[: n_ctx - 1 - first]
        targets = np.asarray(chunk[first + 1 :], dtype=np.int64)
        nll = _nll_of(logits, targets)
        nll_sum += float(nll.sum())
        n_scored += len(targets)
    seconds = time.perf_counter() - t0
    mean = nll_sum / n_scored
    return Perplexity(
        ppl=math.exp(mean),
        nll_mean=mean,
        n_ctx=n_ctx,
        n_chunks=n_chunks,
        n_scored=n_scored,
        n_text_tokens=n_text,
        seconds=seconds,
    )
