"""The decode loop: one thread that plans a step, runs llama_decode, samples and hands events to asyncio.

One round of the loop: collect the step in flight (wait for it, read its sampled tokens), take requests in
and out, retire finished sequences, plan and launch the next step, then turn the collected tokens into
events. Where the output layer is on a GPU, llama_decode only queues the graph, so the last part (text,
stop strings, delivery) runs while the device computes the next step. On the CPU llama_decode computes
in this thread, so the events go out before the next step starts instead of one step late.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from server.engine.batch import TokenBatch
from server.engine.config import MANY_STREAMS, EngineConfig
from server.engine.delivery import EventPump, Item
from server.engine.emit import TopLogprobs, ends_on, token_event
from server.engine.errors import EngineError, EngineStoppedError
from server.engine.llama_context import LlamaRuntime
from server.engine.sampling import Sampler, sorts_vocabulary, token_logprobs
from server.engine.scheduler import Scheduler, Work
from server.engine.sequence import Sequence
from server.engine.step_profile import StepProfile
from server.engine.types import SamplingParams

log = logging.getLogger(__name__)

StepObserver = Callable[[int, int], None]

# Host sampler chains run in C without the GIL, so with this many of them in a step they are spread over a
# thread pool. Only with cores to spare: on a small machine the pool's threads would take cores from
# llama.cpp's own spinning threads.
PARALLEL_SAMPLING_MIN = 4
SAMPLING_THREADS_MAX = 8
SAMPLING_POOL_MIN_CORES = 8


def _sample_chunk(ctx: int, items: list[tuple[Sampler, int]]) -> list[int]:
    return [sampler.sample(ctx, idx) for sampler, idx in items]


@dataclass(frozen=True)
class Sampled:
    """One sequence's new token from a finished step, with its logprobs when asked for."""

    seq: Sequence
    token: int
    is_eog: bool
    logprobs: tuple[float, ...] = ()
    top_logprobs: TopLogprobs = ()


class DecodeLoop:
    """Owns the llama.cpp context after loading: only this thread decodes, samples or edits the KV cache.

    Other threads talk to it through `submit`, `cancel` and `stop`, which only append to lists under a lock.
    The events of a step go to an EventPump in one batch. KV edits and sampler changes happen only while no
    step is in flight.
    """

    def __init__(self, runtime: LlamaRuntime, config: EngineConfig,
                 on_step: StepObserver | None = None) -> None:
        self.rt = runtime
        self.config = config
        self.on_step = on_step
        self.batch = TokenBatch(runtime.n_batch)
        self.sched = Scheduler(runtime, n_slots=runtime.n_seq_max, kv_cells=runtime.kv_cells,
                               n_batch=min(config.n_batch, runtime.n_batch), unified=runtime.kv_unified,
                               prefix_cache=config.prefix_cache and runtime.can_reuse_prefix)
        self.sched.on_leave = self._on_leave
        self.overlap = runtime.output_on_gpu if config.overlap is None else config.overlap
        self._backend_sampling = config.backend_sampling
        self._cond = threading.Condition()
        self._inbox: list[Sequence] = []
        self._cancels: list[Sequence] = []
        self._stopping = False
        self._eog = runtime.eog_tokens()
        self._eog_ids = np.array(self._eog, dtype=np.int64)
        self._outbox: list[Item] = []
        self._pump = EventPump(self.cancel)
        cores = os.cpu_count() or 1
        n_sampling = min(SAMPLING_THREADS_MAX, cores) if cores >= SAMPLING_POOL_MIN_CORES else 1
        self._sampling_pool = (ThreadPoolExecutor(n_sampling, thread_name_prefix="edgeserve-sampling")
                               if n_sampling > 1 else None)
        self._n_sampling = n_sampling
        self.profile = StepProfile()
        # counters, read by stats() from other threads (plain ints: a torn read is impossible under the GIL)
        self.steps = 0
        self.step_tokens_total = 0
        self.last_step_tokens = 0
        self.last_step_seqs = 0
        self.max_step_tokens = 0
        self.max_step_seqs = 0
        self.prompt_tokens_total = 0
        self.generated_tokens_total = 0
        self.sampled_in_graph_total = 0
        self.finished_total = 0
        self.cancelled_total = 0
        self.n_inbox = 0

    # --- called from other threads --------------------------------------------------------------------------

    def submit(self, seq: Sequence) -> None:
        with self._cond:
            if self._stopping:
                raise EngineStoppedError("the engine is stopping")
            self._inbox.append(seq)
            self.n_inbox = len(self._inbox)
            self._cond.notify()

    def cancel(self, seq: Sequence) -> None:
        seq.is_cancelled = True
        with self._cond:
            self._cancels.append(seq)
            self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()

    # --- the thread -----------------------------------------------------------------------------------------

    def run(self) -> None:
        inflight: list[Work] = []
        try:
            while True:
                sampled = self._collect(inflight)
                if not self.overlap:
                    self._emit(sampled)
                    sampled = []
                if not self._next_round():
                    self._emit(sampled)
                    break
                self._retire()
                inflight = self._launch()
                if self.overlap:
                    self._emit(sampled)
        except BaseException as exc:  # a bug or a fatal llama.cpp error: fail every request, do not hang them
            log.exception("engine decode loop died")
            self._fail_all(EngineError(f"the engine's decode loop failed: {exc}"))
            raise
        self._fail_all(EngineStoppedError("the engine was stopped"))

    def _next_round(self) -> bool:
        with self._cond:
            while not (self._inbox or self._cancels or self._stopping or self.sched.running
                       or self.sched.waiting):
                self._cond.wait()
                self.profile.start()  # idle time is no phase of a step
            if self._stopping:
                return False
            inbox, self._inbox = self._inbox, []
            cancels, self._cancels = self._cancels, []
            self.n_inbox = 0
        for seq in cancels:
            self._drop(seq, cancelled=True)
        for seq in inbox:
            if not seq.is_cancelled:
                self._start(seq)
        return True

    def _offload(self, params: SamplingParams) -> bool:
        """Whether this request's chain runs inside the decode graph (EngineConfig says what was measured)."""
        if self._backend_sampling is not None:
            return self._backend_sampling
        if not self.rt.output_on_gpu:
            return False
        return self.config.n_parallel <= MANY_STREAMS or sorts_vocabulary(params)

    def _start(self, seq: Sequence) -> None:
        # Choices without a seed of their own must not share the engine's default one.
        seed = None if self.config.seed is None else self.config.seed + seq.choice
        try:
            sampler = Sampler(seq.params, n_vocab=self.rt.n_vocab, eog_tokens=self._eog, default_seed=seed,
                              offload=self._offload(seq.params), vocab=self.rt.vocab)
        except ValueError as exc:  # Engine.generate checked it: still, one request must not end the loop
            self._post(seq, EngineError(str(exc)))
            seq.is_finished = True
            self._flush()
            return
        sampler.accept_prompt(seq.tokens)
        seq.sampler = sampler
        self.prompt_tokens_total += seq.n_prompt
        self.sched.submit(seq)

    def _drop(self, seq: Sequence, *, cancelled: bool) -> None:
        if seq.is_finished:
            return
        seq.is_finished = True
        # counted before the scheduler lets go: whoever sees `running` drop sees the count too
        if cancelled:
            self.cancelled_total += 1
        else:
            self.finished_total += 1
        self.sched.drop(seq, keep_cache=not cancelled)
        if seq.sampler is not None:
            seq.sampler.free()
            seq.sampler = None

    def _retire(self) -> None:
        """Drop the sequences whose last event is decided (they may still sit in the step just collected)."""
        for seq in [s for s in self.sched.running if s.is_done]:
            self._drop(seq, cancelled=False)
        self.profile.mark("schedule")

    def _on_leave(self, seq: Sequence) -> None:
        # The sequence leaves its slot (finished, cancelled, preempted): its chain leaves the graph with it.
        if seq.sampler is not None:
            seq.sampler.unbind(self.rt)

    # --- one step -------------------------------------------------------------------------------------------

    def _launch(self) -> list[Work]:
        """Plan the next step and start it. Returns its work ([] when nothing could run)."""
        if not (self.sched.running or self.sched.waiting):
            return []
        work = self.sched.plan(self.batch)
        while work:
            for w in work:
                sampler = w.seq.sampler
                if sampler is not None and sampler.can_offload and not sampler.is_bound:
                    sampler.bind(self.rt, w.seq.slot)
            self.profile.mark("schedule")
            rc = self.rt.decode(self.batch.finish())
            self.profile.mark("decode")
            if rc == 0:
                break
            if rc == 1 and self.sched.on_no_kv_slot():
                log.info("KV cache full: freed room (preemptions so far: %d)", self.sched.preemptions)
                work = self.sched.plan(self.batch, admit=False)
                continue
            self._fail_work(work, EngineError(f"llama_decode failed with status {rc}"))
            return []
        if not work:
            with self._cond:  # nothing could be scheduled: wait for a change instead of spinning
                self._cond.wait(0.01)
            self.profile.start()
            return []
        self.sched.commit(work)
        n_tokens = self.batch.n
        self.steps += 1
        self.step_tokens_total += n_tokens
        self.last_step_tokens = n_tokens
        self.last_step_seqs = len(work)
        self.max_step_tokens = max(self.max_step_tokens, n_tokens)
        self.max_step_seqs = max(self.max_step_seqs, len(work))
        return work

    def _collect(self, work: list[Work]) -> list[Sampled]:
        """Wait for the step `work` ran in and take its tokens into their sequences."""
        if not work:
            return []
        self.rt.synchronize()
        self.profile.mark("wait")
        outputs = [w for w in work if w.out_idx >= 0 and not (w.seq.is_done or w.seq.is_cancelled)]
        chained = self._sample_chains(outputs)
        rt = self.rt
        sampled: list[Sampled] = []
        for w in outputs:
            seq = w.seq
            row = None
            token = chained.get(w.out_idx)
            if token is None:
                row = rt.logits(w.out_idx)
                if seq.params.ignore_eos and self._eog_ids.size:
                    row[self._eog_ids] = -np.inf
                token = int(row.argmax())
            seq.tokens.append(token)
            is_eog = rt.is_eog(token)
            if ends_on(seq, token, is_eog):
                seq.is_done = True  # decided now: not planned again, whatever its text turns out to be
            if seq.logprobs:
                # Now: the next step overwrites the logits.
                lp, top = token_logprobs(row if row is not None else rt.logits(w.out_idx), token,
                                         seq.params.logprobs or 0)
                sampled.append(Sampled(seq, token, is_eog, (lp,), (top,) if seq.params.logprobs else ()))
            else:
                sampled.append(Sampled(seq, token, is_eog))
        self.generated_tokens_total += len(sampled)
        self.profile.mark("sample")
        if self.on_step is not None:
            try:
                self.on_step(sum(w.n for w in work), len(work))
            except Exception:
                log.exception("on_step observer failed")
        return sampled

    def _sample_chains(self, outputs: list[Work]) -> dict[int, int]:
        """Tokens of the outputs whose sequences sample with a llama.cpp chain, by batch index."""
        items = []
        tokens: dict[int, int] = {}
        ctx = self.rt.ctx
        for w in outputs:
            sampler = w.seq.sampler
            assert sampler is not None
            if sampler.is_bound:  # sampled inside the graph: read it (and let the chain accept it)
                tokens[w.out_idx] = sampler.sample(ctx, w.out_idx)
            elif not sampler.is_argmax:
                items.append((sampler, w.out_idx))
        self.sampled_in_graph_total += len(tokens)
        if not items:
            return tokens
        if self._sampling_pool is None or len(items) < PARALLEL_SAMPLING_MIN:
            tokens.update((idx, sampler.sample(ctx, idx)) for sampler, idx in items)
            return tokens
        for _, idx in items:
            # Settle the logits here (sync, reorder, copy to host) so the workers' look-ups only read them.
            self.rt.logits(idx)
        n = min(self._n_sampling, len(items))
        chunks = [items[i::n] for i in range(n)]
        futures = [self._sampling_pool.submit(_sample_chunk, ctx, chunk) for chunk in chunks]
        for chunk, future in zip(chunks, futures, strict=True):
            tokens.update(zip((idx for _, idx in chunk), future.result(), strict=True))
        return tokens

    def _emit(self, sampled: list[Sampled]) -> None:
        """Events for the collected tokens, then off to the delivery thread."""
        for s in sampled:
            if s.seq.sink is not None and not s.seq.is_cancelled:
                self._outbox.append((s.seq, token_event(s.seq, s.token, s.is_eog, s.logprobs,
                                                        s.top_logprobs)))
        self.profile.mark("emit")
        self._flush()
        self.profile.mark("deliver")

    def _post(self, seq: Sequence, item: Any) -> None:
        if seq.sink is not None:
            self._outbox.append((seq, item))

    def _flush(self) -> None:
        if self._outbox:
            outbox, self._outbox = self._outbox, []
            self._pump.put(outbox)

    def _fail_work(self, work: list[Work], error: Exception) -> None:
        log.error("%s; failing %d sequences", error, len(work))
        for w in work:
            self._post(w.seq, error)
            self._drop(w.seq, cancelled=True)

    def _fail_all(self, error: Exception) -> None:
        with self._cond:
            self._stopping = True
            pending = self._inbox + list(self.sched.running) + list(self.sched.waiting)
            self._inbox = []
        for seq in pending:
            if not seq.is_finished and not seq.is_cancelled and not seq.is_answered:
                self._post(seq, error)
            self._drop(seq, cancelled=True)
        self._flush()
        self._pump.stop()
        if self._sampling_pool is not None:
            self._sampling_pool.shutdown(wait=True)
