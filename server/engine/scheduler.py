"""What goes into the next engine step: a StepPlan over the waiting and running requests.

Each step takes one token of every decoding request, then prefill chunks of running requests, then admits
waiting ones (first come, first served) while the token budget, free slots and KV allow. With one KV pool the
cells are shared: idle prefix caches are given back first, then the newest running request is preempted (its
KV dropped, requeued first in line to recompute prompt + generated tokens). Pure Python over an injected
`KvOps`: tested without llama.cpp.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from server.engine.kv_cache import KvCache, KvOps
from server.engine.request import Request, RequestStatus
from server.engine.step_plan import ScheduledChunk, StepPlan


class Scheduler:
    """Plans steps over `n_slots` slots and a KV cache of `kv_cells` cells, `n_batch` tokens a step."""

    def __init__(self, kv: KvOps, *, n_slots: int, kv_cells: int, n_batch: int, unified: bool,
                 prefix_cache: bool) -> None:
        self.kv = KvCache(kv, n_slots=n_slots, kv_cells=kv_cells, unified=unified, prefix_cache=prefix_cache)
        self.n_batch = n_batch
        self.unified = unified
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.preemptions = 0
        # Called with a request about to leave its slot (finished, aborted or preempted): its sampler chain
        # must leave llama.cpp's graph with it.
        self.on_leave: Callable[[Request], None] | None = None
        # Speculative decoding's drafts for the step's decoding requests, within a room of tokens
        # (spec/speculator.py); None: no request drafts.
        self.draft: Callable[[list[Request], int], list[tuple[int, ...]]] | None = None

    @property
    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    # --- accounting (read for stats) ------------------------------------------------------------------------

    def kv_used(self) -> int:
        return self.kv.used(self.running)

    def kv_cached(self) -> int:
        return self.kv.cached()

    def kv_free(self) -> int:
        return self.kv.free(self.running)

    # --- requests in and out --------------------------------------------------------------------------------

    def submit(self, req: Request) -> None:
        req.status = RequestStatus.WAITING
        self.waiting.append(req)

    def finish(self, req: Request, status: RequestStatus) -> None:
        """End `req` with a final `status`; its slot keeps its KV for prefix reuse unless it was aborted or
        failed (a half-written cache is worth nothing)."""
        assert status.is_finished
        was_running = req.status == RequestStatus.RUNNING
        req.status = status
        if not was_running:
            if req in self.waiting:
                self.waiting.remove(req)
            return
        self._leave(req, keep_cache=status in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH))

    def _leave(self, req: Request, keep_cache: bool) -> None:
        if self.on_leave is not None:
            self.on_leave(req)
        self.running.remove(req)
        self.kv.leave(req, keep_cache)

    def preempt_newest(self) -> Request | None:
        """Drop the KV of the newest running request and requeue it first in line. None when none runs."""
        if not self.running:
            return None
        req = self.running[-1]
        self._leave(req, keep_cache=False)
        req.status = RequestStatus.WAITING
        req.n_cached = 0
        req.n_shared, req.shared_from = 0, -1
        self.waiting.appendleft(req)
        self.preemptions += 1
        return req

    def on_no_kv_slot(self) -> bool:
        """llama_decode found no room: free idle caches, else preempt the newest. False when neither is
        possible (a request that does not fit even alone)."""
        if self.kv.release_all_idle():
            return True
        if len(self.running) < 2:
            return False
        return self.preempt_newest() is not None

    def commit(self, plan: StepPlan) -> None:
        """The step's decode succeeded: its tokens are now in the cache."""
        for chunk in plan.chunks:
            chunk.req.n_cached += chunk.n_tokens

    # --- planning -------------------------------------------------------------------------------------------

    def schedule(self, admit: bool = True) -> StepPlan:
        """The next step. Admits waiting requests (unless not `admit`: a retry after llama.cpp found no room
        must not take back what it just preempted); may evict idle caches and preempt."""
        preempted: list[Request] = []
        decoders = [r for r in self.running if r.n_pending == 1]
        if self.unified and self.kv_free() < len(decoders):
            self.kv.evict_idle(len(decoders), self.running)
            while self.kv_free() < len(decoders) and len(self.running) > 1:
                victim = self.preempt_newest()
                if victim is not None:
                    preempted.append(victim)
                decoders = [r for r in self.running if r.n_pending == 1]
        drafts = self._drafts(decoders)
        chunks = [ScheduledChunk(r, 1 + len(d), r.n_cached, True, d)
                  for r, d in zip(decoders, drafts, strict=True)]
        n_drafted = sum(len(d) for d in drafts)
        budget = self.n_batch - len(decoders) - n_drafted
        free = self.kv_free() - len(decoders) - n_drafted
        # With a cache per sequence llama.cpp cuts a step into pieces that take an equal share of every
        # sequence in them: decoders beside several prefilling sequences of different lengths make many small
        # pieces. Beside decoders, one sequence prefills at a time.
        prefills = 1 if decoders and not self.unified else len(self.kv.slots)
        for req in self.running:
            if budget <= 0 or prefills <= 0:
                break
            if req.n_pending > 1:
                want = min(req.n_pending, budget)
                if free < want and self.unified:
                    self.kv.evict_idle(len(decoders) + want, self.running)
                    free = self.kv_free() - sum(c.n_tokens for c in chunks)
                n = min(want, free)
                if n > 0:
                    chunks.append(ScheduledChunk(req, n, req.n_cached, n == req.n_pending))
                    budget -= n
                    free -= n
                    prefills -= 1
        admitted: list[Request] = []
        while admit and self.waiting and budget > 0 and prefills > 0:
            req = self.waiting[0]
            if req.is_finished:
                self.waiting.popleft()
                continue
            if not self.kv.admit(req, self.running):
                break
            self.waiting.popleft()
            self._run(req)
            admitted.append(req)
            free = self.kv_free() - sum(c.n_tokens for c in chunks)
            n = min(req.n_pending, budget, free)
            if n > 0:
                chunks.append(ScheduledChunk(req, n, req.n_cached, n == req.n_pending))
                budget -= n
                prefills -= 1
        # Everyone is prefilling and the cache is full: make room by preempting the newest.
        if not chunks and self.running:
            victim = self.preempt_newest()
            if victim is not None and self.running:
                again = self.schedule(admit)
                return StepPlan(again.chunks, tuple(admitted) + again.admitted,
                                (*preempted, victim, *again.preempted), again.n_decode)
            if victim is not None:
                preempted.append(victim)
        return StepPlan(tuple(chunks), tuple(admitted), tuple(preempted), len(decoders))

    def _drafts(self, decoders: list[Request]) -> list[tuple[int, ...]]:
        """Drafts fit in what the step and the pool have left after one token per decoder: a draft never
        evicts a cache or preempts a request."""
        if self.draft is None or not decoders:
            return [()] * len(decoders)
        room = self.n_batch - len(decoders)
        if self.unified:
            room = min(room, self.kv_free() - len(decoders))
        return self.draft(decoders, room)

    def rollback(self, req: Request, n_cached: int) -> None:
        """Drop `req`'s KV cells from position `n_cached` on (draft tokens the target rejected)."""
        if n_cached < req.n_cached:
            self.kv.kv.seq_rm(req.slot, n_cached, -1)
            req.n_cached = n_cached

    def _run(self, req: Request) -> None:
        """`req` holds a slot now; running stays ordered by arrival (a preempted, older request goes back to
        its place)."""
        req.status = RequestStatus.RUNNING
        pos = len(self.running)
        while pos > 0 and self.running[pos - 1].arrival > req.arrival:
            pos -= 1
        self.running.insert(pos, req)
