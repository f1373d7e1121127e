"""The runner executes a StepPlan on llama.cpp: fills the batch, runs llama_decode, samples.

`launch(plan)` fills the reusable batch and starts llama_decode (on a GPU that only queues the graph);
`collect(step)` waits for it and returns one Sampled per request that wanted a token. Sampler chains bound
to a slot ran inside the decode graph and are only read here; the others run on the host, in C without the
GIL, spread over a thread pool where the machine has cores to spare.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from server.engine.batch import TokenBatch
from server.engine.llama_context import LlamaRuntime
from server.engine.request import Request
from server.engine.sampling import Sampler, token_logprobs
from server.engine.step_plan import StepPlan

# Host sampler chains run in C without the GIL, so with this many of them in a step they are spread over a
# thread pool. Only with cores to spare: on a small machine the pool's threads would take cores from
# llama.cpp's own threads.
PARALLEL_SAMPLING_MIN = 4
SAMPLING_THREADS_MAX = 8
SAMPLING_POOL_MIN_CORES = 8

TopLogprobs = tuple[tuple[int, float], ...]


def _sample_chunk(ctx: int, items: list[tuple[Sampler, int]]) -> list[int]:
    return [sampler.sample(ctx, idx) for sampler, idx in items]


@dataclass(frozen=True, slots=True)
class Sampled:
    """One request's new token from a finished step, with its logprob (and the top ones) when asked for."""

    req: Request
    token: int
    logprob: float | None = None
    top: TopLogprobs = ()


@dataclass(frozen=True, slots=True)
class Launched:
    """A step whose llama_decode has been called: the plan and the batch index of each output."""

    plan: StepPlan
    outputs: tuple[tuple[Request, int], ...]  # (request, batch index of its logits)
    # drafting requests: (request, batch index of its first row, its draft); rows follow one per draft token
    verify: tuple[tuple[Request, int, tuple[int, ...]], ...] = ()


class Runner:
    """Owns the batch and the sampling pool; called only from the core's loop thread."""

    def __init__(self, runtime: LlamaRuntime) -> None:
        self.rt = runtime
        self.batch = TokenBatch(runtime.n_batch)
        self._eog_ids = np.array(runtime.eog_tokens(), dtype=np.int64)
        cores = os.cpu_count() or 1
        n = min(SAMPLING_THREADS_MAX, cores) if cores >= SAMPLING_POOL_MIN_CORES else 1
        self._pool = ThreadPoolExecutor(n, thread_name_prefix="edgeserve-sampling") if n > 1 else None
        self._n_pool = n
        self.sampled_in_graph_total = 0

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    # --- launch ---------------------------------------------------------------------------------------------

    def fill(self, plan: StepPlan) -> Launched:
        """Write the plan into the batch: the step, with the batch index of every output it asks for."""
        batch = self.batch
        batch.clear()
        outputs: list[tuple[Request, int]] = []
        verify: list[tuple[Request, int, tuple[int, ...]]] = []
        chunks = plan.chunks
        n_dec = plan.n_decode
        if n_dec:
            decs = [c.req for c in chunks[:n_dec] if not c.draft]
            first = batch.add_decodes([r.tokens[-1] for r in decs], [r.n_cached for r in decs],
                                      [r.slot for r in decs])
            outputs.extend((r, first + i) for i, r in enumerate(decs))
            for chunk in chunks[:n_dec]:
                if chunk.draft:
                    req = chunk.req
                    idx = batch.add_verify([req.tokens[-1], *chunk.draft], req.n_cached, req.slot)
                    verify.append((req, idx, chunk.draft))
        for chunk in chunks[n_dec:]:
            req = chunk.req
            idx = batch.add_run(req.tokens[chunk.start: chunk.start + chunk.n_tokens], chunk.start, req.slot,
                                chunk.wants_output)
            if chunk.wants_output:
                outputs.append((req, idx))
        for req, _ in outputs:
            sampler = req.sampler
            if sampler is not None and sampler.can_offload and not sampler.is_bound:
                sampler.bind(self.rt, req.slot)
        return Launched(plan, tuple(outputs), tuple(verify))

    def decode(self) -> int:
        """llama_decode of the filled batch: 0 ok, 1 no KV room (nothing was computed), else an error."""
        return self.rt.decode(self.batch.finish())

    # --- collect --------------------------------------------------------------------------------------------

    def collect(self, step: Launched) -> list[Sampled]:
        """Wait for `step`, then one token for each of its outputs whose request still runs."""
        self.rt.synchronize()
        live = [(req, idx) for req, idx in step.outputs if not req.is_finished]
        chained = self._sample_chains(live)
        out: list[Sampled] = []
        for req, idx in live:
            out.append(self._sampled(req, idx, chained.get(idx)))
        for req, first, draft in step.verify:
            if not req.is_finished:
                out.extend(self._verify(req, first, draft))
        return out

    def _sampled(self, req: Request, idx: int, token: int | None) -> Sampled:
        """The token at batch index `idx` (`token` where a chain already sampled it), with its logprobs."""
        row = None
        if token is None:
            row = self.rt.logits(idx)
            if req.params.ignore_eos and self._eog_ids.size:
                row[self._eog_ids] = -np.inf
            token = int(row.argmax())
        if req.wants_logprobs:
            # Now: the next step overwrites the logits.
            lp, top = token_logprobs(row if row is not None else self.rt.logits(idx), token,
                                     req.params.logprobs or 0)
            return Sampled(req, token, lp, top)
        return Sampled(req, token)

    def _verify(self, req: Request, first: int, draft: tuple[int, ...]) -> list[Sampled]:
        """Sample a drafting request's rows in order with its own sampler until a token differs from the
        draft (or ends the generation): the accepted draft tokens and one more (spec/speculator.py says why
        this keeps the target's distribution). The request's chain sees exactly the tokens it emits."""
        sampler = req.sampler
        assert sampler is not None and not sampler.is_bound  # a drafting request samples on the host
        ctx = self.rt.ctx
        out: list[Sampled] = []
        for i in range(len(draft) + 1):
            idx = first + i
            s = self._sampled(req, idx, None if sampler.is_argmax else sampler.sample(ctx, idx))
            out.append(s)
            ends = self.rt.is_eog(s.token) and not req.params.ignore_eos
            if i == len(draft) or s.token != draft[i] or ends:
                break
        return out

    def _sample_chains(self, outputs: list[tuple[Request, int]]) -> dict[int, int]:
        """Tokens of the outputs whose requests sample with a llama.cpp chain, by batch index."""
        items: list[tuple[Sampler, int]] = []
        tokens: dict[int, int] = {}
        ctx = self.rt.ctx
        for req, idx in outputs:
            sampler = req.sampler
            assert sampler is not None
            if sampler.is_bound:  # sampled inside the graph: read it (and let the chain accept it)
                tokens[idx] = sampler.sample(ctx, idx)
            elif not sampler.is_argmax:
                items.append((sampler, idx))
        self.sampled_in_graph_total += len(tokens)
        if not items:
            return tokens
        if self._pool is None or len(items) < PARALLEL_SAMPLING_MIN:
            tokens.update((idx, sampler.sample(ctx, idx)) for sampler, idx in items)
            return tokens
        for _, idx in items:
            # Settle the logits here (sync, reorder, copy to host) so the workers' look-ups only read them.
            self.rt.logits(idx)
        n = min(self._n_pool, len(items))
        chunks = [items[i::n] for i in range(n)]
        futures = [self._pool.submit(_sample_chunk, ctx, chunk) for chunk in chunks]
        for chunk, future in zip(chunks, futures, strict=True):
            tokens.update(zip((idx for _, idx in chunk), future.result(), strict=True))
        return tokens
