"""The decode loop: one thread that plans a step, runs llama_decode, samples and hands events to asyncio."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from server.engine.batch import TokenBatch
from server.engine.config import EngineConfig
from server.engine.delivery import EventPump, Item
from server.engine.errors import EngineError, EngineStoppedError
from server.engine.llama_context import LlamaRuntime
from server.engine.sampling import Sampler, token_logprobs
from server.engine.scheduler import Scheduler, Work
from server.engine.sequence import Sequence
from server.engine.types import FinishReason, StreamEvent

log = logging.getLogger(__name__)

StepObserver = Callable[[int, int], None]

# Sampler chains run in C without the GIL, so with this many chain-sampled outputs in a step they are spread
# over a thread pool: at 64 streams and a 128k vocabulary the chains cost more than the step itself.
PARALLEL_SAMPLING_MIN = 4
SAMPLING_THREADS_MAX = 8


def _sample_chunk(ctx: int, items: list[tuple[Sampler, int]]) -> list[int]:
    return [sampler.sample(ctx, idx) for sampler, idx in items]


class DecodeLoop:
    """Owns the llama.cpp context after loading: only this thread decodes, samples or edits the KV cache.

    Other threads talk to it through `submit`, `cancel` and `stop`, which only append to lists under a lock.
    The events of a step go to an EventPump in one batch.
    """

    def __init__(self, runtime: LlamaRuntime, config: EngineConfig,
                 on_step: StepObserver | None = None) -> None:
        self.rt = runtime
        self.config = config
        self.on_step = on_step
        self.batch = TokenBatch(runtime.n_batch)
        self.sched = Scheduler(runtime, n_slots=runtime.n_seq_max, kv_cells=runtime.kv_cells,
                               n_batch=min(config.n_batch, runtime.n_batch), unified=config.kv_unified,
                               prefix_cache=config.prefix_cache and runtime.can_reuse_prefix)
        self._cond = threading.Condition()
        self._inbox: list[Sequence] = []
        self._cancels: list[Sequence] = []
        self._stopping = False
        self._eog = runtime.eog_tokens()
        self._eog_ids = np.array(self._eog, dtype=np.int64)
        self._outbox: list[Item] = []
        self._pump = EventPump(self.cancel)
        n_sampling = min(SAMPLING_THREADS_MAX, os.cpu_count() or 1)
        self._sampling_pool = (ThreadPoolExecutor(n_sampling, thread_name_prefix="edgeserve-sampling")
                               if n_sampling > 1 else None)
        self._n_sampling = n_sampling
        # counters, read by stats() from other threads (plain ints: a torn read is impossible under the GIL)
        self.steps = 0
        self.step_tokens_total = 0
        self.last_step_tokens = 0
        self.last_step_seqs = 0
        self.max_step_tokens = 0
        self.max_step_seqs = 0
        self.prompt_tokens_total = 0
        self.generated_tokens_total = 0
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
        try:
            while self._next_round():
                if self.sched.running or self.sched.waiting:
                    self._step()
                self._flush()
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

    def _start(self, seq: Sequence) -> None:
        sampler = Sampler(seq.params, n_vocab=self.rt.n_vocab, eog_tokens=self._eog,
                          default_seed=self.config.seed)
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

    def _step(self) -> None:
        work = self.sched.plan(self.batch)
        while work:
            rc = self.rt.decode(self.batch.finish())
            if rc == 0:
                break
            if rc == 1 and self.sched.on_no_kv_slot():
                log.info("KV cache full: freed room (preemptions so far: %d)", self.sched.preemptions)
                work = self.sched.plan(self.batch, admit=False)
                continue
            self._fail_work(work, EngineError(f"llama_decode failed with status {rc}"))
            return
        if not work:
            with self._cond:  # nothing could be scheduled: wait for a change instead of spinning
                self._cond.wait(0.01)
            return
        self.sched.commit(work)
        n_tokens = self.batch.n
        self.steps += 1
        self.step_tokens_total += n_tokens
        self.last_step_tokens = n_tokens
        self.last_step_seqs = len(work)
        self.max_step_tokens = max(self.max_step_tokens, n_tokens)
        self.max_step_seqs = max(self.max_step_seqs, len(work))
        outputs = [w for w in work if w.out_idx >= 0 and not w.seq.is_finished]
        chained = self._sample_chains(outputs)
        rt = self.rt
        for w in outputs:
            seq = w.seq
            row = None
            token = chained.get(w.out_idx)
            if token is None:
                row = rt.logits(w.out_idx)
                if seq.params.ignore_eos and self._eog_ids.size:
                    row[self._eog_ids] = -np.inf
                token = int(row.argmax())
            self._on_token(seq, token, w.out_idx, row)
        if self.on_step is not None:
            try:
                self.on_step(n_tokens, len(work))
            except Exception:
                log.exception("on_step observer failed")

    def _sample_chains(self, outputs: list[Work]) -> dict[int, int]:
        """Tokens of the outputs whose sequences sample with a llama.cpp chain, by batch index."""
        items = []
        for w in outputs:
            sampler = w.seq.sampler
            assert sampler is not None
            if not sampler.is_argmax:
                items.append((sampler, w.out_idx))
        if not items:
            return {}
        ctx = self.rt.ctx
        if self._sampling_pool is None or len(items) < PARALLEL_SAMPLING_MIN:
            return {idx: sampler.sample(ctx, idx) for sampler, idx in items}
        for _, idx in items:
            # Settle the logits here (sync, reorder, copy to host) so the workers' look-ups only read them.
            self.rt.logits(idx)
        n = min(self._n_sampling, len(items))
        chunks = [items[i::n] for i in range(n)]
        futures = [self._sampling_pool.submit(_sample_chunk, ctx, chunk) for chunk in chunks]
        tokens: dict[int, int] = {}
        for chunk, future in zip(chunks, futures, strict=True):
            tokens.update(zip((idx for _, idx in chunk), future.result(), strict=True))
        return tokens

    def _on_token(self, seq: Sequence, token: int, out_idx: int, row: np.ndarray | None) -> None:
        seq.tokens.append(token)
        self.generated_tokens_total += 1
        params = seq.params
        finish: FinishReason | None = None
        lps: tuple[float, ...] = ()
        tops: tuple[tuple[tuple[int, float], ...], ...] = ()
        if seq.logprobs:
            lp, top = token_logprobs(row if row is not None else self.rt.logits(out_idx), token,
                                     params.logprobs or 0)
            lps, tops = (lp,), ((top,) if params.logprobs else ())
        stopped = False
        if not params.ignore_eos and self.rt.is_eog(token):
            finish, text = "stop", ""
        else:
            text = seq.detok.push(token)
            if seq.stops.is_active:
                text, stopped = seq.stops.feed(text)
                if stopped:
                    finish = "stop"
        if finish is None and seq.n_generated >= params.max_tokens:
            finish = "length"
        if finish is not None and not stopped:
            tail = seq.detok.flush()
            if seq.stops.is_active:
                more, stopped = seq.stops.feed(tail)
                text += more if stopped else more + seq.stops.flush()
                if stopped:
                    finish = "stop"
            else:
                text += tail
        event = StreamEvent(text, (token,), finish, seq.n_prompt, seq.n_generated, lps, tops)
        self._post(seq, event)
        if finish is not None:
            self._drop(seq, cancelled=False)

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
            if not seq.is_finished and not seq.is_cancelled:
                self._post(seq, error)
            self._drop(seq, cancelled=True)
        self._flush()
        self._pump.stop()
        if self._sampling_pool is not None:
            self._sampling_pool.shutdown(wait=True)
