"""KV accounting: which slot (llama.cpp sequence id) holds which request, how many cells each holds, and the
prefixes idle slots keep for reuse.

llama.cpp places the cells itself; this module only counts them and tells llama.cpp (through `KvOps`) which
sequence's cells to drop or copy. With one pool (`unified`) the slots share `kv_cells` cells: an idle slot's
cached prefix is given back first when they run short, and a new request can take its prefix from any slot.
With a cache per sequence every slot owns n_ctx cells and the length check at submission means a running
request never runs out; a prefix is reused only from the slot the request lands in (or its leader's).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from server.engine.request import Request


class KvOps(Protocol):
    """The KV edits llama.cpp does for the accounting (LlamaRuntime implements them; tests record them)."""

    def seq_rm(self, seq: int, p0: int = -1, p1: int = -1) -> bool: ...

    def seq_cp(self, src: int, dst: int, p0: int = -1, p1: int = -1) -> None: ...


@dataclass
class Slot:
    """A llama.cpp sequence id. An idle slot may keep its last request's KV (`cached`) for prefix reuse."""

    idx: int
    req: Request | None = None
    cached: list[int] = field(default_factory=list)
    n_shared: int = 0
    shared_from: int = -1
    last_used: int = 0

    @property
    def is_free(self) -> bool:
        return self.req is None

    def kv_tokens(self) -> list[int]:
        """Tokens whose KV this slot holds, from position 0."""
        if self.req is not None:
            return self.req.tokens[: self.req.n_cached]
        return self.cached


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


class KvCache:
    """`n_slots` slots over `kv_cells` cells; `running` is the scheduler's list of requests holding slots."""

    def __init__(self, kv: KvOps, *, n_slots: int, kv_cells: int, unified: bool, prefix_cache: bool) -> None:
        self.kv = kv
        self.slots = [Slot(i) for i in range(n_slots)]
        self.kv_cells = kv_cells
        self.unified = unified
        self.prefix_cache = prefix_cache
        self.reused_tokens = 0
        self._tick = 0

    # --- counts ---------------------------------------------------------------------------------------------

    def used(self, running: list[Request]) -> int:
        return sum(r.n_owned_cells for r in running)

    def cached(self) -> int:
        return sum(len(sl.cached) - sl.n_shared for sl in self.slots if sl.req is None)

    def free(self, running: list[Request]) -> int:
        if not self.unified:
            return 1 << 30
        return self.kv_cells - self.used(running) - self.cached()

    def has_free_slot(self) -> bool:
        return any(sl.req is None for sl in self.slots)

    # --- giving cells back ----------------------------------------------------------------------------------

    def release(self, slot: Slot) -> None:
        """Drop every cell of `slot`; slots that borrowed a prefix from it now own those cells."""
        self.kv.seq_rm(slot.idx)
        slot.cached = []
        slot.n_shared = 0
        slot.shared_from = -1
        for other in self.slots:
            if other.req is not None and other.req.shared_from == slot.idx:
                other.req.n_shared, other.req.shared_from = 0, -1
            elif other.req is None and other.shared_from == slot.idx:
                other.n_shared, other.shared_from = 0, -1

    def evict_idle(self, cells_needed: int, running: list[Request],
                   keep: tuple[Slot | None, ...] = ()) -> bool:
        """Give back idle prefix caches (least recently used first, never those in `keep`) until
        `cells_needed` are free. True when anything was given back."""
        evicted = False
        while self.free(running) < cells_needed:
            idle = [sl for sl in self.slots if sl.req is None and sl.cached and sl not in keep]
            if not idle:
                break
            self.release(min(idle, key=lambda sl: sl.last_used))
            evicted = True
        return evicted

    def release_all_idle(self) -> bool:
        """Drop every idle prefix cache (llama.cpp found no room for a step). True when there was one."""
        idle = [sl for sl in self.slots if sl.req is None and sl.cached]
        for sl in idle:
            self.release(sl)
        return bool(idle)

    def leave(self, req: Request, keep_cache: bool) -> None:
        """`req` gives its slot up; the slot keeps the request's KV for reuse only when `keep_cache`."""
        slot = self.slots[req.slot]
        slot.req = None
        self._tick += 1
        slot.last_used = self._tick
        req.slot = -1
        if req.n_cached > len(req.tokens):
            # Cells of draft tokens no verification has judged yet (the request ended while its step ran).
            self.kv.seq_rm(slot.idx, len(req.tokens), -1)
            req.n_cached = len(req.tokens)
        if keep_cache and self.prefix_cache and req.n_cached > 0:
            slot.cached = req.tokens[: req.n_cached]
            slot.n_shared, slot.shared_from = req.n_shared, req.shared_from
        else:
            self.release(slot)

    # --- taking a slot --------------------------------------------------------------------------------------

    @staticmethod
    def leader_pending(req: Request) -> bool:
        """A later choice of a request waits while the first one still computes the prompt they share."""
        leader = req.leader
        if leader is None or leader.is_finished:
            return False
        return leader.n_cached < min(leader.n_prompt, len(req.tokens)) - 1

    @staticmethod
    def _leader_reuse(req: Request) -> int:
        """Prompt tokens a later choice can take from its leader's KV."""
        leader = req.leader
        if leader is None or leader.slot < 0 or leader.is_finished:
            return 0
        return max(0, min(leader.n_cached, leader.n_prompt, len(req.tokens)) - 1)

    def _copy_from_leader(self, req: Request, target: Slot) -> int:
        """With a KV cache per sequence: copy the leader's whole stream to `target` (llama.cpp copies only
        whole streams between sequences), then cut it to the shared prompt. Returns the tokens reused."""
        assert req.leader is not None
        reuse = self._leader_reuse(req)
        self.release(target)
        self.kv.seq_cp(req.leader.slot, target.idx, -1, -1)
        if not self.kv.seq_rm(target.idx, reuse, -1):
            self.release(target)
            return 0
        return reuse

    def _best_source(self, req: Request, free: list[Slot]) -> tuple[Slot, Slot | None, int]:
        """The slot `req` lands in, the slot its prefix comes from (None: the target's own), the prefix."""
        limit = len(req.tokens) - 1  # at least one token must be fed to get logits
        target = min(free, key=lambda sl: (len(sl.cached), sl.last_used))
        reuse, source = 0, None
        if not self.prefix_cache:
            return target, None, 0
        for sl in free:
            n = common_prefix_len(sl.cached, req.tokens, limit)
            if n > reuse:
                target, reuse = sl, n
        if self.unified:
            for sl in self.slots:
                if sl is target:
                    continue
                n = common_prefix_len(sl.kv_tokens(), req.tokens, limit)
                if n > reuse:
                    source, reuse = sl, n
        if source is not None:
            # the prefix comes from another slot: take the free slot whose own cache is worth least
            target = min(free, key=lambda sl: (len(sl.cached), sl.last_used))
        return target, source, reuse

    def admit(self, req: Request, running: list[Request]) -> bool:
        """Give `req` a slot, reusing the longest cached prefix. False (nothing changed) if it must wait."""
        free = [sl for sl in self.slots if sl.req is None]
        if not free or self.leader_pending(req):
            return False
        target, source, reuse = self._best_source(req, free)
        if self.unified and not self._room_for(req, target, source, reuse, running):
            return False
        if source is not None:
            self.release(target)
            self.kv.seq_cp(source.idx, target.idx, 0, reuse)
            req.n_shared, req.shared_from = reuse, source.idx
        elif not self.unified and self._leader_reuse(req) > reuse:
            reuse = self._copy_from_leader(req, target)
        elif reuse > 0:
            if not self.kv.seq_rm(target.idx, reuse, -1):
                self.release(target)
                reuse = 0
            else:
                req.n_shared = min(target.n_shared, reuse)
                req.shared_from = target.shared_from if req.n_shared else -1
            target.cached, target.n_shared, target.shared_from = [], 0, -1
        else:
            self.release(target)
        target.req = req
        req.slot = target.idx
        req.n_cached = reuse
        req.n_reused += reuse
        self.reused_tokens += reuse
        return True

    def _room_for(self, req: Request, target: Slot, source: Slot | None, reuse: int,
                  running: list[Request]) -> bool:
        """With one pool: whether the cells `req` needs (and one more per running request next step) are
        free, after giving back idle caches other than the two this admission uses."""
        needed = len(req.tokens) - reuse
        growth = len(running)
        if source is None and target.cached:
            reclaim = len(target.cached) - reuse  # reusing the target's own prefix: its tail goes back
        else:
            reclaim = len(target.cached) - target.n_shared
        if self.free(running) + reclaim >= needed + growth:
            return True
        self.evict_idle(needed + growth - reclaim, running, keep=(target, source))
        return self.free(running) + reclaim >= needed + growth or not running
