"""The residency planner (server/gateway/models/residency.py), exhaustively: every resident set of up to three
models over sizes, pins, requests in flight, loads under way, priorities and recency, against every request
size and two budgets, checked against what the plan must guarantee."""

from __future__ import annotations

import itertools

import pytest

from quantize.model.units import MIB
from server.gateway.models.residency import Action, Resident, decide, eviction_order

SIZES = (1, 2, 3)
# (pinned, in_flight, loading): idle, pinned, busy, loading
KINDS = ((False, 0, False), (True, 0, False), (False, 2, False), (False, 0, True))
BUDGETS = (4, 6)


def _residents() -> list[tuple[Resident, ...]]:
    sets: list[tuple[Resident, ...]] = [()]
    for count in (1, 2, 3):
        for combo in itertools.product(SIZES, KINDS, repeat=count):
            # Recency runs against the order and the middle model has a higher priority: both orderings
            # are exercised (their own tests below pin them down).
            residents = tuple(
                Resident(name=f"m{i}", planned_bytes=size * MIB, last_used=float(10 - i), pinned=kind[0],
                         in_flight=kind[1], loading=kind[2], priority=i % 2)
                for i, (size, kind) in enumerate(zip(combo[0::2], combo[1::2], strict=True)))
            sets.append(residents)
    return sets


ALL = _residents()


def test_the_search_space_is_what_it_claims() -> None:
    assert len(ALL) == 1 + 12 + 12**2 + 12**3


@pytest.mark.parametrize("budget", BUDGETS)
def test_every_decision_keeps_the_plan(budget: int) -> None:
    checked = 0
    for residents in ALL:
        used = sum(r.planned_bytes for r in residents)
        if used > budget * MIB:
            continue  # a state the pool never reaches: it only loads what fits
        for need in (1, 2, 3, 4, 5, 7):
            d = decide(residents, budget * MIB, "new", need * MIB)
            by_name = {r.name: r for r in residents}
            idle = eviction_order(residents)
            idle_bytes = sum(r.planned_bytes for r in idle)
            free = budget * MIB - used
            if need * MIB > budget * MIB:
                assert d.action == Action.REFUSE and "more than the whole" in d.reason
            elif d.action == Action.LOAD:
                evicted = [by_name[n] for n in d.evict]
                # Only idle models go, in eviction order, and no more than needed.
                assert all(r.evictable for r in evicted)
                assert [r.name for r in idle[: len(evicted)]] == list(d.evict)
                assert free + sum(r.planned_bytes for r in evicted) >= need * MIB
                if evicted:
                    assert free + sum(r.planned_bytes for r in evicted[:-1]) < need * MIB
            else:
                # Not even every idle model frees enough; the blockers are what else would have to go.
                assert free + idle_bytes < need * MIB
                assert d.blockers and not d.evict
                blockers = [by_name[n] for n in d.blockers]
                assert all(not r.evictable for r in blockers)
                assert free + idle_bytes + sum(r.planned_bytes for r in blockers) >= need * MIB
                for name in d.blockers:
                    assert name in d.reason
                if any(r.pinned for r in blockers):
                    assert d.action == Action.REFUSE and "pinned" in d.reason
                else:
                    assert d.action == Action.WAIT
                # Waiting helps only when the busy and loading models would free enough on their own.
                transient = sum(r.planned_bytes for r in residents if not r.evictable and not r.pinned)
                assert (d.action == Action.WAIT) == (free + idle_bytes + transient >= need * MIB)
            checked += 1
    assert checked > 2_000


def test_a_resident_model_is_ready_whatever_the_budget() -> None:
    residents = (Resident("a", 3 * MIB, 1.0), Resident("b", 3 * MIB, 2.0))
    assert decide(residents, 1 * MIB, "a", 3 * MIB).action == Action.READY


def test_least_recently_used_goes_first_and_lower_priority_before_it() -> None:
    residents = (Resident("old", MIB, last_used=1.0), Resident("new", MIB, last_used=5.0),
                 Resident("kept", MIB, last_used=0.0, priority=1))
    assert decide(residents, 3 * MIB, "x", MIB).evict == ("old",)
    assert decide(residents, 3 * MIB, "x", 2 * MIB).evict == ("old", "new")
    assert decide(residents, 3 * MIB, "x", 3 * MIB).evict == ("old", "new", "kept")


def test_pinned_busy_and_loading_models_are_never_evicted() -> None:
    residents = (Resident("pin", MIB, 0.0, pinned=True), Resident("busy", MIB, 0.0, in_flight=1),
                 Resident("loading", MIB, 0.0, loading=True), Resident("idle", MIB, 9.0))
    d = decide(residents, 4 * MIB, "x", MIB)
    assert d.action == Action.LOAD and d.evict == ("idle",)


def test_the_refusal_names_what_would_have_to_go() -> None:
    residents = (Resident("chat", 3 * MIB, 0.0, pinned=True), Resident("coder", 2 * MIB, 0.0, in_flight=2))
    d = decide(residents, 6 * MIB, "big", 4 * MIB)
    assert d.action == Action.REFUSE
    assert d.blockers == ("coder", "chat")
    assert "coder (2 MiB, 2 requests running)" in d.reason and "chat (3 MiB, pinned)" in d.reason
    assert d.reason.startswith("big needs 4 MiB; 1 MiB of the 6 MiB budget are free")


def test_busy_models_mean_wait_not_refuse() -> None:
    residents = (Resident("coder", 2 * MIB, 0.0, in_flight=1), Resident("embed", MIB, 0.0, loading=True))
    d = decide(residents, 3 * MIB, "chat", 3 * MIB)
    assert d.action == Action.WAIT and set(d.blockers) == {"coder", "embed"}
    assert not d.can_serve
