"""The scheduler's decisions as StepPlan values, with a recording stand-in for llama.cpp's KV edits: no model,
no llama.cpp (the scheduler only counts cells and names the edits)."""

from __future__ import annotations

from server.engine.request import Request, RequestStatus
from server.engine.scheduler import Scheduler
from server.engine.step_plan import StepPlan
from server.engine.types import SamplingParams


class RecordingKv:
    """KvOps that records every edit instead of touching a cache."""

    def __init__(self) -> None:
        self.edits: list[tuple[str, int, int, int, int]] = []

    def seq_rm(self, seq: int, p0: int = -1, p1: int = -1) -> bool:
        self.edits.append(("rm", seq, -1, p0, p1))
        return True

    def seq_cp(self, src: int, dst: int, p0: int = -1, p1: int = -1) -> None:
        self.edits.append(("cp", src, dst, p0, p1))


def req(i: int, n_prompt: int, max_tokens: int = 16, first: int = 1) -> Request:
    return Request(i, list(range(first, first + n_prompt)), SamplingParams(max_tokens=max_tokens))


def sched(*, n_slots: int = 4, kv_cells: int = 1024, n_batch: int = 64, unified: bool = True,
          prefix_cache: bool = True) -> Scheduler:
    return Scheduler(RecordingKv(), n_slots=n_slots, kv_cells=kv_cells, n_batch=n_batch, unified=unified,
                     prefix_cache=prefix_cache)


def decode_once(s: Scheduler, plan: StepPlan, token: int = 7) -> None:
    """What the core does after a step: commit, then one sampled token for every request that wanted one."""
    s.commit(plan)
    for chunk in plan.chunks:
        if chunk.wants_output:
            chunk.req.tokens.append(token)


def test_empty_plan_and_status_order() -> None:
    assert sched().schedule().is_empty
    assert StepPlan.make_empty().n_tokens == 0
    assert [s.is_finished for s in RequestStatus] == [False, False, True, True, True, True]
    assert RequestStatus.FINISHED_LENGTH.finish_reason == "length"
    assert RequestStatus.RUNNING.finish_reason is None


def test_prefill_is_chunked_by_the_batch_and_decoders_come_first() -> None:
    s = sched(n_batch=64)
    a, b = req(1, 100), req(2, 30, first=500)
    s.submit(a)
    s.submit(b)
    plan = s.schedule()
    assert plan.admitted == (a,)  # a takes the whole budget: 64 of its 100 tokens
    assert [(c.req, c.n_tokens, c.start, c.wants_output) for c in plan.chunks] == [(a, 64, 0, False)]
    assert a.status == RequestStatus.RUNNING and b.status == RequestStatus.WAITING
    decode_once(s, plan)
    plan = s.schedule()
    # a finishes its prompt (36 tokens), b is admitted beside it with the 28 tokens left of the budget
    assert [(c.req, c.n_tokens, c.wants_output) for c in plan.chunks] == [(a, 36, True), (b, 28, False)]
    decode_once(s, plan)
    plan = s.schedule()
    assert plan.n_decode == 1 and plan.chunks[0].req is a and plan.chunks[0].n_tokens == 1
    assert [(c.req, c.n_tokens, c.wants_output) for c in plan.chunks[1:]] == [(b, 2, True)]


def test_a_cache_per_sequence_prefills_one_request_beside_decoders() -> None:
    s = sched(unified=False, n_batch=256)
    first = req(1, 10)
    s.submit(first)
    decode_once(s, s.schedule())
    for i in range(2, 5):
        s.submit(req(i, 20, first=100 * i))
    plan = s.schedule()
    assert plan.n_decode == 1
    assert len(plan.chunks) == 2  # the decoder and ONE prefilling request, though the budget has room
    s2 = sched(unified=True, n_batch=256)
    first2 = req(1, 10)
    s2.submit(first2)
    decode_once(s2, s2.schedule())
    for i in range(2, 5):
        s2.submit(req(i, 20, first=100 * i))
    assert len(s2.schedule().chunks) == 4  # one pool: every new prompt prefills in the same step


def test_one_pool_preempts_the_newest_when_cells_run_out() -> None:
    s = sched(n_slots=2, kv_cells=40, n_batch=64)
    a, b = req(1, 18), req(2, 18, first=300)
    s.submit(a)
    s.submit(b)
    plan = s.schedule()
    assert plan.admitted == (a, b)
    decode_once(s, plan)  # 36 cells used, 2 sampled tokens pending
    for _ in range(2):
        plan = s.schedule()
        decode_once(s, plan)
    assert s.kv_free() == 0
    plan = s.schedule()
    assert plan.preempted == (b,)
    assert b.status == RequestStatus.WAITING and b.n_cached == 0 and s.waiting[0] is b
    assert [c.req for c in plan.chunks] == [a]
    assert s.preemptions == 1


def test_finish_keeps_the_prefix_unless_aborted_and_a_new_request_reuses_it() -> None:
    s = sched(n_slots=2)
    a = req(1, 12)
    s.submit(a)
    decode_once(s, s.schedule())
    s.finish(a, RequestStatus.FINISHED_LENGTH)
    assert a.status == RequestStatus.FINISHED_LENGTH and s.kv_cached() == 12
    again = Request(2, [*list(range(1, 13)), 99, 98], SamplingParams())
    s.submit(again)
    plan = s.schedule()
    assert again.n_reused == 12 and plan.chunks[0].start == 12 and plan.chunks[0].n_tokens == 2
    s.finish(again, RequestStatus.FINISHED_ABORTED)
    assert s.kv_cached() == 0  # an aborted request's cache is worth nothing: released
    assert ("rm", again.slot if again.slot >= 0 else 0, -1, -1, -1) in s.kv.kv.edits  # type: ignore[attr-defined]


def test_one_pool_copies_a_running_requests_prefix_to_a_new_one() -> None:
    s = sched(n_slots=2)
    a = req(1, 40)
    s.submit(a)
    decode_once(s, s.schedule())
    b = Request(2, [*list(range(1, 31)), 555], SamplingParams())
    s.submit(b)
    plan = s.schedule()
    assert b in plan.admitted and b.n_shared == 30 and b.shared_from == a.slot
    assert ("cp", a.slot, b.slot, 0, 30) in s.kv.kv.edits  # type: ignore[attr-defined]


def test_a_waiting_request_that_was_aborted_is_dropped_from_the_queue() -> None:
    s = sched(n_slots=1)
    a, b = req(1, 5), req(2, 5, first=50)
    s.submit(a)
    s.submit(b)
    s.schedule()
    s.finish(b, RequestStatus.FINISHED_ABORTED)
    assert list(s.waiting) == [] and b.is_finished
    s.finish(a, RequestStatus.FINISHED_ABORTED)
    assert s.running == [] and not s.has_work
