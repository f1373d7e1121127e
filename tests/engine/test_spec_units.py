"""Speculative decoding's parts without a model: prompt lookup, the adaptive draft length and its off-switch,
the speculator's per-step decisions, and the scheduler's accounting of draft cells (a recording stand-in for
llama.cpp's KV edits, as in test_scheduler.py)."""

from __future__ import annotations

import pytest

from server.engine.config import SPEC_SEQS_CPU, SPEC_SEQS_GPU, EngineConfig
from server.engine.request import Request, RequestStatus
from server.engine.scheduler import Scheduler
from server.engine.spec.draft_length import (
    JUDGE_AFTER,
    PAUSE_STEPS,
    DraftLength,
    best_length,
    expected_tokens,
    extra_token_cost,
)
from server.engine.spec.ngram import NgramIndex
from server.engine.spec.speculator import Speculator
from server.engine.types import SamplingParams


class RecordingKv:
    def __init__(self) -> None:
        self.edits: list[tuple[str, int, int, int]] = []

    def seq_rm(self, seq: int, p0: int = -1, p1: int = -1) -> bool:
        self.edits.append(("rm", seq, p0, p1))
        return True

    def seq_cp(self, src: int, dst: int, p0: int = -1, p1: int = -1) -> None:
        self.edits.append(("cp", src, dst, p0))


def spec_config(**kw: object) -> EngineConfig:
    # extra tokens free (spec_token_cost 0): draft lengths follow the heuristic alone
    return EngineConfig(**{"spec_type": "ngram-simple", "spec_token_cost": 0.0, **kw})  # type: ignore[arg-type]


# --- prompt lookup ----------------------------------------------------------------------------------------


def test_lookup_drafts_what_followed_the_newest_earlier_occurrence() -> None:
    idx = NgramIndex(3)
    tokens = [1, 2, 3, 4, 5, 9, 2, 3, 6, 7, 1, 2, 3]
    # [1, 2, 3] occurred once before, at the start: what followed it
    assert idx.propose(tokens, 3) == (4, 5, 9)
    tokens += [4]
    # [2, 3, 4] occurred at 1..3; then 5, 9, ...
    assert idx.propose(tokens, 2) == (5, 9)


def test_lookup_falls_back_to_shorter_ngrams_and_prefers_the_newest() -> None:
    idx = NgramIndex(4)
    tokens = [5, 6, 10, 5, 6, 11, 8, 5, 6]
    # no earlier [x, 8, 5, 6]; [8, 5, 6] neither; [5, 6]: newest earlier occurrence is at 3..4, then 11
    assert idx.propose(tokens, 2) == (11, 8)
    assert NgramIndex(3).propose([1, 2, 3, 4], 4) == ()  # nothing repeats
    assert NgramIndex(3).propose([1, 2, 1, 2], 0) == ()


def test_lookup_stops_at_the_end_of_what_is_known() -> None:
    idx = NgramIndex(2)
    tokens = [7, 8, 7, 8]
    assert idx.propose(tokens, 10) == (7, 8)  # the continuation runs into the key itself, no further


# --- draft length and its off-switch ------------------------------------------------------------------------


def test_draft_length_follows_acceptance() -> None:
    d = DraftLength(n_min=1, n_max=8, accept_min=0.3)
    assert d.want(0.0) == 4  # halfway before anything is known
    d.record(4, 4)
    assert d.want(0.0) == 6
    d.record(8, 3)  # partial: one more than accepted
    assert d.want(0.0) == 4
    d.record(4, 4)  # whole: two longer
    assert d.want(0.0) == 6
    d.record(6, 6)
    d.record(8, 8)
    assert d.want(0.0) == 8  # never above n_max


def test_drafts_are_as_long_as_pays_for_their_cost() -> None:
    assert expected_tokens(0.5, 2) == 1.75 and expected_tokens(1.0, 3) == 4.0
    # one more token at 0.65 of a step (this CPU): only a sequence that is accepted often drafts, and short
    assert best_length(0.5, 0.65, 8) == 0
    assert best_length(0.8, 0.65, 8) == 1
    assert 1 < best_length(0.97, 0.65, 8) < 8
    # nearly free tokens (a GPU's memory-bound step): long drafts
    assert best_length(0.8, 0.02, 8) >= 6
    # the same token weighs more in a step of many sequences: at 8 on this CPU nothing pays
    assert extra_token_cost(0.65, 1) == pytest.approx(0.65)
    assert extra_token_cost(0.65, 8) > 0.9
    assert best_length(0.9, extra_token_cost(0.65, 8), 8) == 0
    d = DraftLength(n_min=1, n_max=8, accept_min=0.3)
    assert d.want(0.65) == 1  # the prior acceptance pays for one token
    for _ in range(30):
        d.record(d.want(0.65), d.k if d.k <= 8 else 8)
    assert d.want(0.65) > 1


def test_low_acceptance_pauses_a_sequence_longer_each_time() -> None:
    d = DraftLength(n_min=1, n_max=4, accept_min=0.3)
    judged = 0
    while not d.is_paused:
        d.record(2, 0)
        judged += 1
    assert judged >= JUDGE_AFTER
    pauses = 0
    while d.want() == 0:
        pauses += 1
    assert pauses == PAUSE_STEPS
    while not d.is_paused:
        d.record(2, 0)
    second = 0
    while d.want() == 0:
        second += 1
    assert second == 2 * PAUSE_STEPS
    # good acceptance never pauses
    good = DraftLength(n_min=1, n_max=4, accept_min=0.3)
    for _ in range(100):
        good.record(4, 2)
        assert good.want() > 0


def test_where_no_draft_pays_a_sequence_pauses_after_judging() -> None:
    d = DraftLength(n_min=1, n_max=8, accept_min=0.0)
    for _ in range(JUDGE_AFTER):
        assert d.want(0.65) == 1
        d.record(1, 0 if _ % 2 else 1)  # half accepted: does not pay at 0.65
    assert d.want(0.65) == 0 and d.is_paused


# --- the speculator ----------------------------------------------------------------------------------------


def running(i: int, tokens: list[int], max_tokens: int = 64, speculative: bool | None = None) -> Request:
    r = Request(i, list(tokens), SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                                speculative=speculative))
    r.slot = i
    return r


def test_requests_draft_unless_they_turn_it_off() -> None:
    sp = Speculator(spec_config(), output_on_gpu=False)
    on, off = running(0, [1, 2, 3, 1, 2]), running(1, [1, 2, 3, 1, 2], speculative=False)
    sp.attach(on)
    sp.attach(off)
    assert on.spec is not None and off.spec is None
    assert sp.drafts([on, off], room=100) == [(3, 1, 2), ()]
    plain = Speculator(EngineConfig(), output_on_gpu=False)
    r = running(2, [1, 2, 1])
    plain.attach(r)
    assert r.spec is None


def test_a_large_batch_drafts_nothing_and_counts_the_step() -> None:
    sp = Speculator(spec_config(), output_on_gpu=False)
    assert sp.seq_limit == SPEC_SEQS_CPU
    assert Speculator(spec_config(), output_on_gpu=True).seq_limit == SPEC_SEQS_GPU
    reqs = [running(i, [1, 2, 3, 1, 2]) for i in range(SPEC_SEQS_CPU + 1)]
    for r in reqs:
        sp.attach(r)
    assert sp.drafts(reqs, room=1000) == [()] * len(reqs)
    assert sp.skipped_steps_total == 1
    assert all(d for d in sp.drafts(reqs[:SPEC_SEQS_CPU], room=1000))


def test_drafts_stay_within_max_tokens_and_the_room() -> None:
    sp = Speculator(spec_config(spec_draft_n_max=8), output_on_gpu=False)
    tokens = list(range(10)) * 3
    near_end = running(0, tokens, max_tokens=3)
    near_end.n_prompt = len(tokens) - 1  # one token generated: two left, so one draft token at most
    a, b = running(1, tokens), running(2, tokens)
    for r in (near_end, a, b):
        sp.attach(r)
    drafts = sp.drafts([near_end, a, b], room=6)
    assert [len(d) for d in drafts] == [1, 4, 1]  # b gets what is left of the room
    sp.record(a, 4, 2)
    assert sp.drafted_total == 4 and sp.accepted_total == 2 and sp.verified_total == 1
    assert a.spec is not None and a.spec.length.k == 3

    cpu = Speculator(spec_config(spec_token_cost=None), output_on_gpu=False)
    c = running(3, tokens)
    cpu.attach(c)
    assert cpu.drafts([c], room=10) == [(0,)]  # one token: what a new sequence's prior acceptance pays for


# --- the scheduler's cells ---------------------------------------------------------------------------------


def test_a_draft_takes_cells_and_a_rollback_gives_back_the_rejected_ones() -> None:
    kv = RecordingKv()
    s = Scheduler(kv, n_slots=2, kv_cells=64, n_batch=32, unified=True, prefix_cache=True)
    r = Request(1, [1, 2, 3, 4, 1, 2], SamplingParams(max_tokens=16, temperature=0.0))
    s.submit(r)
    s.commit(s.schedule())
    r.tokens.append(3)
    s.draft = lambda decs, room: [(4, 1, 2)] * len(decs)
    plan = s.schedule()
    (chunk,) = plan.chunks
    assert chunk.draft == (4, 1, 2) and chunk.n_tokens == 4 and chunk.start == 6
    s.commit(plan)
    assert r.n_cached == 10 and s.kv_used() == 10
    r.tokens += [4, 9]  # the first draft token accepted, then the target's own
    s.rollback(r, len(r.tokens) - 1)
    assert kv.edits[-1] == ("rm", r.slot, 8, -1)
    assert r.n_cached == 8 and s.kv_used() == 8 and r.n_pending == 1


def test_a_draft_never_evicts_or_preempts() -> None:
    s = Scheduler(RecordingKv(), n_slots=2, kv_cells=8, n_batch=32, unified=True, prefix_cache=True)
    r = Request(1, [1, 2, 3, 4, 5, 6], SamplingParams(max_tokens=2, temperature=0.0))
    s.submit(r)
    s.commit(s.schedule())
    r.tokens.append(7)
    rooms: list[int] = []
    s.draft = lambda decs, room: rooms.append(room) or [()] * len(decs)  # type: ignore[func-returns-value]
    s.schedule()
    assert rooms == [8 - 6 - 1]  # what is free after the decoder's own token


def test_a_request_that_ends_with_cells_of_an_unjudged_draft_keeps_only_its_tokens() -> None:
    kv = RecordingKv()
    s = Scheduler(kv, n_slots=1, kv_cells=64, n_batch=32, unified=True, prefix_cache=True)
    r = Request(1, [1, 2, 3, 1, 2], SamplingParams(max_tokens=16, temperature=0.0))
    s.submit(r)
    s.commit(s.schedule())
    r.tokens.append(3)
    s.draft = lambda decs, room: [(1, 2)] * len(decs)
    s.commit(s.schedule())
    assert r.n_cached == 8 and len(r.tokens) == 6
    s.finish(r, RequestStatus.FINISHED_STOPPED)  # a stop string: the slot keeps its prefix
    assert ("rm", 0, 6, -1) in kv.edits
    assert s.kv.slots[0].cached == [1, 2, 3, 1, 2, 3] and s.kv_cached() == 6


def test_new_sequences_start_from_the_servers_acceptance() -> None:
    sp = Speculator(spec_config(), output_on_gpu=False)
    old = running(0, [1, 2, 3, 1, 2])
    sp.attach(old)
    for _ in range(100):
        sp.record(old, 2, 0)  # a draft that is never accepted
    assert sp.alpha < 0.3
    new = running(1, [1, 2, 3, 1, 2])
    sp.attach(new)
    assert new.spec is not None
    # it pauses before drafting at all, then probes with one token
    steps = 0
    while new.spec.length.want(0.65) == 0:
        steps += 1
    assert steps == 1 + PAUSE_STEPS  # the step that decided it, then the pause
    # a probe accepted whole: drafting goes on where it pays
    new.spec.length.record(1, 1)
    fresh = Speculator(spec_config(), output_on_gpu=False)
    first = running(2, [1, 2, 3, 1, 2])
    fresh.attach(first)
    assert first.spec is not None and first.spec.length.want(0.0) == 4  # nothing known: the prior
