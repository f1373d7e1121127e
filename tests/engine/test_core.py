"""The engine core on its own, driven by its messages in this thread (no front, no pipes): what it sends per
step, how an abort frees the real KV, and a request it cannot run."""

from __future__ import annotations

import pytest

from quantize.bundled import smollm2_path
from server.engine.config import EngineConfig
from server.engine.core import EngineCore
from server.engine.llama_context import LlamaRuntime
from server.engine.protocol import (
    AbortRequests,
    AddRequest,
    ChoiceFailed,
    StatsUpdate,
    StepOutputs,
    ToFront,
)
from server.engine.types import SamplingParams


@pytest.fixture(scope="module")
def runtime(engine_threads):
    rt = LlamaRuntime(EngineConfig(model_path=str(smollm2_path()), n_ctx=256, n_parallel=3,
                                   n_threads=engine_threads, kv_unified=True))
    yield rt
    rt.close()


@pytest.fixture
def core(runtime: LlamaRuntime) -> tuple[EngineCore, list[ToFront]]:
    sent: list[ToFront] = []
    config = EngineConfig(model_path=str(smollm2_path()), n_ctx=256, n_parallel=3, kv_unified=True)
    for slot in range(3):
        runtime.seq_rm(slot)
    return EngineCore(runtime, config, sent.append), sent


def run_steps(core: EngineCore, n: int) -> list[StepOutputs]:
    out = []
    for _ in range(n):
        assert core._take_input(block=False)
        step = core.step()
        if step is not None:
            core._deliver(step)
            out.append(step)
    return out


def test_every_step_sends_its_tokens_with_the_state_after_it(core) -> None:
    eng, sent = core
    prompt = tuple(eng.rt.tokenize("The capital of France is"))
    eng.post(AddRequest(1, prompt, (SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True),)))
    run_steps(eng, 5)
    steps = [m for m in sent if isinstance(m, StepOutputs)]
    outputs = [o for m in steps for o in m.outputs]
    assert [o.finish for o in outputs] == [None, None, None, None, "length"]
    assert all(m.stats is not None for m in steps)
    first, last = steps[0].stats, steps[-1].stats
    assert first is not None and last is not None
    assert first.running == 1 and last.running == 0
    assert last.steps_total == first.steps_total + 4
    assert last.requests_finished_total == first.requests_finished_total + 1
    assert steps[0].n_tokens == len(prompt) and steps[1].n_tokens == 1


def test_abort_frees_the_slot_and_llama_cpps_cells(core) -> None:
    eng, sent = core
    prompt = tuple(eng.rt.tokenize("Once upon a time there was a"))
    eng.post(AddRequest(7, prompt, (SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True),)))
    run_steps(eng, 3)
    slot = eng.scheduler.running[0].slot
    assert eng.rt.seq_pos_max(slot) >= len(prompt)
    eng.post(AbortRequests(7))
    assert eng._take_input(block=True)  # applies the abort; the state goes out once idle
    assert eng._take_input(block=False)
    assert not eng.scheduler.has_work
    assert eng.rt.seq_pos_max(slot) == -1  # an aborted request's cells are dropped, not kept for reuse
    update = [m for m in sent if isinstance(m, StatsUpdate)][-1]
    assert update.stats.requests_cancelled_total == 1 and update.stats.running == 0
    # nothing more is sent for it
    assert not any(o.req_id == 7 for m in sent[sent.index(update):] if isinstance(m, StepOutputs)
                   for o in m.outputs)


def test_a_stop_found_by_the_front_keeps_the_prefix_for_reuse(core) -> None:
    eng, _ = core
    prompt = tuple(eng.rt.tokenize("Name three colors."))
    eng.post(AddRequest(3, prompt, (SamplingParams(max_tokens=50, temperature=0.0),)))
    run_steps(eng, 3)
    eng.post(AbortRequests(3, finished=True))
    assert eng._take_input(block=False)
    stats = eng.stats()
    assert stats.requests_finished_total == 1 and stats.requests_cancelled_total == 0
    assert stats.kv_cached_cells >= len(prompt)
    eng.post(AddRequest(4, prompt, (SamplingParams(max_tokens=2, temperature=0.0),)))
    run_steps(eng, 2)
    assert eng.stats().prefix_reused_tokens_total >= len(prompt) - 1


def test_a_choice_whose_chain_cannot_build_fails_alone(core) -> None:
    eng, sent = core
    good = SamplingParams(max_tokens=2, temperature=0.0)
    bad = SamplingParams(max_tokens=2, temperature=0.0, grammar="root ::= (")
    eng.post(AddRequest(9, tuple(eng.rt.tokenize("Hi")), (good, bad)))
    run_steps(eng, 3)
    failed = [m for m in sent if isinstance(m, ChoiceFailed)]
    assert [(f.req_id, f.choice) for f in failed] == [(9, 1)]
    outputs = [o for m in sent if isinstance(m, StepOutputs) for o in m.outputs]
    assert {o.choice for o in outputs} == {0}
