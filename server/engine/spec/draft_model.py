"""A draft model (llama-server's draft-simple): a smaller GGUF with the target's vocabulary, its own context
and KV cache, drafting greedily for every drafting sequence in one batch.

Sequence `slot` of the draft context mirrors slot `slot` of the target's: it holds the KV of the tokens the
draft last saw there. To draft, each sequence catches up (its cells beyond the common prefix with the
request's tokens are dropped, the tokens after it fed, in batches of n_batch), then every sequence that still
wants tokens decodes one more in a shared batch, k times at most. The draft is greedy (argmax): a draft that
is a deterministic function of the tokens lets the target's verification keep its distribution by sampling
alone (speculator.py says why).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from server.engine.batch import TokenBatch
from server.engine.errors import ModelLoadError
from server.engine.kv_cache import common_prefix_len
from server.engine.llama_context import LlamaRuntime

if TYPE_CHECKING:
    from server.engine.config import EngineConfig
    from server.engine.request import Request

log = logging.getLogger(__name__)


class DraftModel:
    """The draft model's context, one sequence per target slot."""

    def __init__(self, config: EngineConfig, target: LlamaRuntime) -> None:
        assert config.spec_draft_model is not None
        # The same context shape as the target's (slots, cells, batch), one output per sequence per step.
        draft_config = config.model_copy(update={"model_path": config.spec_draft_model, "spec_type": "none"})
        self.rt = LlamaRuntime(draft_config)
        if self.rt.n_vocab != target.n_vocab:
            self.rt.close()
            raise ModelLoadError(f"the draft model's vocabulary has {self.rt.n_vocab} tokens, the model's "
                                 f"{target.n_vocab}: a draft model must share the model's vocabulary")
        self.batch = TokenBatch(self.rt.n_batch)
        self._seen: dict[int, list[int]] = {}  # slot -> tokens whose KV the draft's sequence holds

    def forget(self, req: Request) -> None:
        del req  # the slot's cells stay: the next request there may share a prefix with them

    def close(self) -> None:
        self.rt.close()

    def propose(self, reqs: Sequence[Request], lengths: Sequence[int]) -> list[tuple[int, ...]]:
        try:
            return self._propose(reqs, lengths)
        except RuntimeError:
            # The draft's cache is full (or llama.cpp failed on it): start it afresh, draft nothing this step.
            log.info("draft model: no room for this step's drafts; its cache starts afresh")
            for slot in list(self._seen):
                self.rt.seq_rm(slot)
            self._seen.clear()
            return [()] * len(reqs)

    def _propose(self, reqs: Sequence[Request], lengths: Sequence[int]) -> list[tuple[int, ...]]:
        drafts = [[t] for t in self._catch_up(reqs)]
        live = [i for i in range(len(reqs)) if lengths[i] > 1]
        while live:
            self.batch.clear()
            rows = []
            for i in live:
                req = reqs[i]
                seen = self._seen[req.slot]
                rows.append(self.batch.add_run([drafts[i][-1]], len(seen), req.slot, True))
                seen.append(drafts[i][-1])
            self._decode()
            for i, row in zip(live, rows, strict=True):
                drafts[i].append(self._argmax(row))
            live = [i for i in live if len(drafts[i]) < lengths[i]]
        return [tuple(d) for d in drafts]

    def _catch_up(self, reqs: Sequence[Request]) -> list[int]:
        """Feed each sequence the tokens its draft has not seen; the first draft token of each."""
        first = [0] * len(reqs)
        waiting: list[tuple[int, int]] = []  # (request index, batch index of its last row) in this batch
        self.batch.clear()
        for i, req in enumerate(reqs):
            seen = self._seen.setdefault(req.slot, [])
            # At least the last token is fed again: its logits give the first draft token.
            keep = common_prefix_len(seen, req.tokens, len(req.tokens) - 1)
            if keep < len(seen):
                self.rt.seq_rm(req.slot, keep, -1)
                del seen[keep:]
            tokens, pos = req.tokens[keep:], keep
            while tokens:
                if self.batch.free == 0:
                    self._decode()
                    first = self._read(waiting, first)
                    waiting = []
                    self.batch.clear()
                n = min(len(tokens), self.batch.free)
                last = n == len(tokens)
                idx = self.batch.add_run(tokens[:n], pos, req.slot, last)
                seen.extend(tokens[:n])
                if last:
                    waiting.append((i, idx))
                tokens, pos = tokens[n:], pos + n
        self._decode()
        return self._read(waiting, first)

    def _read(self, waiting: list[tuple[int, int]], first: list[int]) -> list[int]:
        for i, idx in waiting:
            first[i] = self._argmax(idx)
        return first

    def _argmax(self, idx: int) -> int:
        return int(np.argmax(self.rt.logits(idx)))

    def _decode(self) -> None:
        rc = self.rt.decode(self.batch.finish())
        if rc != 0:
            raise RuntimeError(f"draft model llama_decode failed with status {rc}")
