"""What goes into the next engine step: slots, KV accounting, chunked prefill, prefix reuse, preemption."""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from server.engine.batch import TokenBatch
from server.engine.sequence import Sequence


class KvOps(Protocol):
    def seq_rm(self, seq: int, p0: int = -1, p1: int = -1) -> bool: ...

    def seq_cp(self, src: int, dst: int, p0: int = -1, p1: int = -1) -> None: ...


@dataclass
class Slot:
    """A llama.cpp sequence id. An idle slot may keep its last sequence's KV (`cached`) for prefix reuse."""

    idx: int
    seq: Sequence | None = None
    cached: list[int] = field(default_factory=list)
    n_shared: int = 0
    shared_from: int = -1
    last_used: int = 0

    @property
    def is_free(self) -> bool:
        return self.seq is None

    def kv_tokens(self) -> list[int]:
        """Tokens whose KV this slot holds, from position 0."""
        if self.seq is not None:
            return self.seq.tokens[: self.seq.n_cached]
        return self.cached


@dataclass(frozen=True)
class Work:
    """What one sequence contributes to a step: `n` tokens, and the batch index of its logits (-1: none)."""

    seq: Sequence
    n: int
    out_idx: int


def common_prefix_len(a: list[int], b: list[int], limit: int) -> int:
    """Length of the common prefix of a and b, at most `limit` (binary search over C-level slice compares)."""
    hi = min(len(a), len(b), limit)
    if hi <= 0 or a[0] != b[0]:
        return 0
    lo = 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


class Scheduler:
    """Plans steps over `n_slots` sequence slots and a KV cache of `kv_cells` cells.

    Each step takes one token for every decoding sequence, then prefill chunks of running sequences, then
    admits waiting ones (first come, first served) while the token budget, free slots and KV allow. With a
    unified cache the cells are shared: idle prefix caches are given back first, then the newest running
    sequence is preempted (its KV dropped, requeued at the front to recompute prompt + generated tokens).
    Without a unified cache every slot owns n_ctx / n_slots cells and the length check at submission means it
    never runs out.
    """

    def __init__(self, kv: KvOps, *, n_slots: int, kv_cells: int, n_batch: int, unified: bool,
                 prefix_cache: bool) -> None:
        self.kv = kv
        self.slots = [Slot(i) for i in range(n_slots)]
        self.kv_cells = kv_cells
        self.n_batch = n_batch
        self.unified = unified
        self.prefix_cache = prefix_cache
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.preemptions = 0
        self.reused_tokens = 0
        self._tick = 0
        # Called with a sequence about to leave its slot (finished, cancelled or preempted).
        self.on_leave: Callable[[Sequence], None] | None = None

    # --- accounting -----------------------------------------------------------------------------------------

    def kv_used(self) -> int:
        return sum(s.n_owned_cells for s in self.running)

    def kv_cached(self) -> int:
        return sum(len(sl.cached) - sl.n_shared for sl in self.slots if sl.seq is None)

    def kv_free(self) -> int:
        if not self.unified:
            return 1 << 30
        return self.kv_cells - self.kv_used() - self.kv_cached()

    def _release_cells(self, slot: Slot) -> None:
        """Drop every cell of `slot`; slots that borrowed a prefix from it now own those cells."""
        self.kv.seq_rm(slot.idx)
        slot.cached = []
        slot.n_shared = 0
        slot.shared_from = -1
        for other in self.slots:
            if other.seq is not None and other.seq.shared_from == slot.idx:
                other.seq.n_shared, other.seq.shared_from = 0, -1
            elif other.seq is None and other.shared_from == slot.idx:
                other.n_shared, other.shared_from = 0, -1

    def evict_idle(self, cells_needed: int) -> bool:
        """Give back idle prefix caches (least recently used first) until `cells_needed` are free."""
        evicted = False
        while self.kv_free() < cells_needed:
            idle = [sl for sl in self.slots if sl.seq is None and sl.cached]
            if not idle:
                break
            self._release_cells(min(idle, key=lambda sl: sl.last_used))
            evicted = True
        return evicted

    # --- lifecycle ------------------------------------------------------------------------------------------

    def submit(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def drop(self, seq: Sequence, keep_cache: bool) -> None:
        """Take a finished or cancelled sequence out; its slot keeps its KV only when `keep_cache`."""
        if seq.slot < 0:
            with contextlib.suppress(ValueError):
                self.waiting.remove(seq)
            return
        if self.on_leave is not None:
            self.on_leave(seq)
        self.running.remove(seq)
        slot = self.slots[seq.slot]
        slot.seq = None
        self._tick += 1
        slot.last_used = self._tick
        seq.slot = -1
        if keep_cache and self.prefix_cache and seq.n_cached > 0:
            slot.cached = seq.tokens[: seq.n_cached]
            slot.n_shared, slot.shared_from = seq.n_shared, seq.shared_from
        else:
            self._release_cells(slot)

    def preempt_newest(self) -> Sequence | None:
        """Drop the KV of the newest running sequence and requeue it first in line. None when none runs."""
        if not self.running:
            return None
        seq = self.running[-1]
        self.drop(seq, keep_cache=False)
        seq.n_cached = 0
        seq.n_shared, seq.shared_from = 0, -1
        self.waiting.appendleft(seq)
        self.preemptions += 1
        return seq

    def on_no_kv_slot(self) -> bool:
        """llama_decode found no room: free idle caches, else preempt the newest. False when neither is
        possible (a sequence that does not fit even alone)."""
        idle = [sl for sl in self.slots if sl.seq is None and sl.cached]
        if idle:
            for sl in idle:
                self._release_cells(sl)
            return True
        if len(self.running) < 2:
            return False
        return self.preempt_newest() is not None

    # --- admission ------------------------------------------------------------------------------------------

    @staticmethod
    def _leader_pending(seq: Sequence) -> bool:
        """A later choice of a request waits while the first one still computes the prompt they share."""
        leader = seq.leader
        if leader is None or leader.is_finished or leader.is_cancelled:
            return False
        return leader.n_cached < min(leader.n_prompt, len(seq.tokens)) - 1

    @staticmethod
    def _leader_reuse(seq: Sequence) -> int:
        """Prompt tokens a later choice can take from its leader's KV."""
        leader = seq.leader
        if leader is None or leader.slot < 0 or leader.is_finished:
            return 0
        return max(0, min(leader.n_cached, leader.n_prompt, len(seq.tokens)) - 1)

    def _copy_from_leader(self, seq: Sequence, target: Slot) -> int:
        """With a KV cache per sequence: copy the leader's whole stream to `target` (llama.cpp copies only
        whole streams between sequences), then cut it to the shared prompt. Returns the tokens reused."""
        assert seq.leader is not None
        reuse = self._leader_reuse(seq)
        self._release_cells(target)
        self.kv.seq_cp(seq.leader.slot, target.idx, -1, -1)
        if not self.kv.seq_rm(target.idx, reuse, -1):
            self._release_cells(target)
            return 0
        return reuse

    def _admit(self, seq: Sequence) -> bool:
        """Give `seq` a slot, reusing the longest cached prefix. False (nothing changed) if it must wait."""
        free = [sl for sl in self.slots if sl.seq is None]
        if not free or self._leader_pending(seq):
            return False
        limit = len(seq.tokens) - 1  # at least one token must be fed to get logits
        target = min(free, key=lambda sl: (len(sl.cached), sl.last_used))
        reuse, source = 0, None
        if self.prefix_cache:
            for sl in free:
                n = common_prefix_len(sl.cached, seq.tokens, limit)
                if n > reuse:
                    target, reuse = sl, n
            if self.unified:
                for sl in self.slots:
                    if sl is target:
                        continue
                    n = common_prefix_len(sl.kv_tokens(), seq.tokens, limit)
                    if n > reuse:
                        source, reuse = sl, n
        if source is not None:
            # the prefix comes from another slot: take the free slot whose own cache is worth least
            target = min(free, key=lambda sl: (len(sl.cached), sl.last_used))
        needed = len(seq.tokens) - reuse
        if self.unified:
            growth = len(self.running)  # one more token for each running sequence next step
            if source is None and target.cached:
                # reusing the target's own prefix: its tail goes back to the pool
                reclaim = len(target.cached) - reuse
            else:
                reclaim = len(target.cached) - target.n_shared
            avail = self.kv_free() + reclaim
            if avail < needed + growth:
                self.evict_idle_except(needed + growth - reclaim, keep=(target, source))
                avail = self.kv_free() + reclaim
                if avail < needed + growth and self.running:
                    return False
        if source is not None:
            self._release_cells(target)
            self.kv.seq_cp(source.idx, target.idx, 0, reuse)
            seq.n_shared, seq.shared_from = reuse, source.idx
        elif not self.unified and self._leader_reuse(seq) > reuse:
            reuse = self._copy_from_leader(seq, target)
        elif reuse > 0:
            if not self.kv.seq_rm(target.idx, reuse, -1):
                self._release_cells(target)
                reuse = 0
            else:
                seq.n_shared = min(target.n_shared, reuse)
                seq.shared_from = target.shared_from if seq.n_shared else -1
            target.cached, target.n_shared, target.shared_from = [], 0, -1
        else:
            self._release_cells(target)
        target.seq = seq
        seq.slot = target.idx
        seq.n_cached = reuse
        seq.n_reused += reuse
        self.reused_tokens += reuse
        # running stays ordered by arrival: a preempted (older) sequence goes back to its place
        pos = len(self.running)
        while pos > 0 and self.running[pos - 1].arrival > seq.arrival:
            pos -= 1
        self.running.insert(pos, seq)
        return True

    def evict_idle_except(self, cells_needed: int, keep: tuple[Slot | None, ...]) -> None:
        while self.kv_free() < cells_needed:
            idle = [sl for sl in self.slots if sl.seq is None and sl.cached and sl not in keep]
            if not idle:
                return
            self._release_cells(min(idle, key=lambda sl: sl.last_used))

    # --- planning -------------------------------------------------------------------------------------------

    def plan(self, batch: TokenBatch, admit: bool = True) -> list[Work]:
        """Fill `batch` for the next step. Admits waiting sequences (unless not `admit`: a retry after
        llama.cpp found no room must not take back what it just preempted); may evict idle caches, preempt."""
        batch.clear()
        decoders = [s for s in self.running if s.n_pending == 1]
        if self.unified and self.kv_free() < len(decoders):
            self.evict_idle(len(decoders))
            while self.kv_free() < len(decoders) and len(self.running) > 1:
                self.preempt_newest()
                decoders = [s for s in self.running if s.n_pending == 1]
        work: list[Work] = []
        if decoders:
            first = batch.add_decodes([s.tokens[-1] for s in decoders], [s.n_cached for s in decoders],
                                      [s.slot for s in decoders])
            work.extend(Work(s, 1, first + i) for i, s in enumerate(decoders))
        budget = self.n_batch - len(decoders)
        planned = len(decoders)
        free = self.kv_free() - planned
        # With a cache per sequence llama.cpp cuts a step into pieces that take an equal share of every
        # sequence in them: decoders beside several prefilling sequences of different lengths make many small
        # pieces. Beside decoders, one sequence prefills at a time.
        prefills = 1 if decoders and not self.unified else len(self.slots)
        for seq in self.running:
            if budget <= 0 or prefills <= 0:
                break
            if seq.n_pending > 1:
                want = min(seq.n_pending, budget)
                if free < want and self.unified:
                    self.evict_idle(planned + want)
                    free = self.kv_free() - planned
                n = min(want, free)
                if n > 0:
                    work.append(self._add_chunk(batch, seq, n))
                    budget -= n
                    free -= n
                    planned += n
                    prefills -= 1
        while admit and self.waiting and budget > 0 and prefills > 0:
            seq = self.waiting[0]
            if seq.is_cancelled:
                self.waiting.popleft()
                continue
            if not self._admit(seq):
                break
            self.waiting.popleft()
            free = self.kv_free() - sum(w.n for w in work)
            n = min(seq.n_pending, budget, free)
            if n > 0:
                work.append(self._add_chunk(batch, seq, n))
                budget -= n
                prefills -= 1
        # Everyone is prefilling and the cache is full: make room by preempting the newest.
        if not work and self.running and self.preempt_newest() is not None and self.running:
            return self.plan(batch, admit)
        return work

    @staticmethod
    def _add_chunk(batch: TokenBatch, seq: Sequence, n: int) -> Work:
        start = seq.n_cached
        want = n == seq.n_pending
        idx = batch.add_run(seq.tokens[start: start + n], start, seq.slot, want)
        return Work(seq, n, idx if want else -1)

    def commit(self, work: list[Work]) -> None:
        """The step's decode succeeded: its tokens are now in the cache."""
        for w in work:
            w.seq.n_cached += w.n
