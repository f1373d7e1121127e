"""Speculative decoding in the engine, on the CPU with the bundled SmolLM2: greedy output token for token as
without speculation (prompt lookup and a draft model), sampled output on the target's distribution, the
features that ride on sampling (logprobs, stop strings, n, grammar), llama.cpp's real cells against the KV
accounting, and the off-switch for a batch too large.

"Identical" is checked against the same engine configuration with speculation off: a cache per sequence
(kv_unified off), so a sequence's logits never depend on what else shares its step.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path

import pytest

from quantize.bundled import smollm2_path
from server.engine.config import EngineConfig
from server.engine.core import EngineCore
from server.engine.engine import Engine
from server.engine.errors import SpeculationUnavailableError
from server.engine.llama_context import LlamaRuntime
from server.engine.protocol import AddRequest, StepOutputs, ToFront
from server.engine.types import SamplingParams

PROMPTS = Path(__file__).resolve().parents[2] / "bench" / "data" / "spec_prompts.jsonl"
MAX_TOKENS = 48


def _config(**kw: object) -> EngineConfig:
    # No prefix cache: a prompt taken from the cache computes only its last token, in a batch of its own,
    # which on this CPU can change a greedy token by itself; both engines compute every prompt alike.
    base: dict[str, object] = dict(model_path=str(smollm2_path()), n_ctx=512, n_parallel=4, n_batch=512,
                                   kv_unified=False, prefix_cache=False)
    base.update(kw)
    return EngineConfig(**base)  # type: ignore[arg-type]


def _prompts(engine: Engine, n: int) -> list[list[int]]:
    rows = [json.loads(line) for line in PROMPTS.read_text().splitlines()[:n]]
    return [engine.tokenize(engine.apply_chat_template(r["messages"])) for r in rows]


@pytest.fixture(scope="module")
def engines(engine_threads):
    off = Engine(_config(n_threads=engine_threads))
    ngram = Engine(_config(n_threads=engine_threads, spec_type="ngram-simple"))
    off.start()
    ngram.start()
    yield off, ngram
    off.stop()
    ngram.stop()


async def _all(drive, engine: Engine, prompts, params: SamplingParams):
    return await asyncio.gather(*(drive.collect(engine, p, params) for p in prompts))


@pytest.mark.slow
def test_greedy_prompt_lookup_is_token_for_token_the_same(engines, drive) -> None:
    off, ngram = engines
    prompts = _prompts(off, 3)
    params = drive.greedy(MAX_TOKENS)
    before = ngram.stats()
    # one at a time (speculation on) and three together (the batch limit allows them all to draft)
    alone = [drive.run(drive.collect(ngram, p, params)) for p in prompts[:1]]
    together = drive.run(_all(drive, ngram, prompts, params))
    want = drive.run(_all(drive, off, prompts, params))
    assert [r.tokens for r in alone] == [want[0].tokens]
    assert [r.tokens for r in together] == [r.tokens for r in want]
    assert [r.text for r in together] == [r.text for r in want]
    stats = ngram.stats()
    drafted = stats.spec_drafted_total - before.spec_drafted_total
    accepted = stats.spec_accepted_total - before.spec_accepted_total
    assert drafted > 0 and 0 < accepted <= drafted
    # fewer sequence-steps than tokens: drafts were accepted
    assert stats.tokens_per_seq_step > 1.0
    assert off.stats().spec_drafted_total == 0 and off.stats().tokens_per_seq_step == 1.0


@pytest.mark.slow
def test_greedy_with_a_draft_model_is_token_for_token_the_same(engines, drive, engine_threads) -> None:
    off, _ = engines
    # the bundled model drafting for itself: same vocabulary, and nearly every draft token is accepted
    draft = Engine(_config(n_threads=engine_threads, n_parallel=2, spec_type="draft-simple",
                           spec_draft_model=str(smollm2_path()), spec_draft_n_max=4))
    draft.start()
    try:
        prompts = _prompts(off, 2)
        params = drive.greedy(32)
        got = drive.run(_all(drive, draft, prompts, params))
        want = drive.run(_all(drive, off, prompts, params))
        assert [r.tokens for r in got] == [r.tokens for r in want]
        stats = draft.stats()
        assert stats.spec_drafted_total > 0 and stats.spec_accepted_total > 0
    finally:
        draft.stop()


@pytest.mark.slow
def test_logprobs_stops_n_and_grammar_ride_along(engines, drive) -> None:
    off, ngram = engines
    # a prompt neither engine has seen: no prefix cache, so both compute it the same way
    prompt = _prompts(off, 6)[5]

    def both(params: SamplingParams):
        return drive.run(drive.collect(ngram, prompt, params)), drive.run(drive.collect(off, prompt, params))

    got, want = both(SamplingParams(max_tokens=24, temperature=0.0, logprobs=2))
    assert got.tokens == want.tokens
    lp_got = [lp for e in got.events for lp in e.logprobs]
    lp_want = [lp for e in want.events for lp in e.logprobs]
    assert len(lp_got) == len(got.tokens) == len(lp_want)
    assert lp_got == pytest.approx(lp_want, abs=1e-3)
    assert [[t for t, _ in top] for e in got.events for top in e.top_logprobs] == \
        [[t for t, _ in top] for e in want.events for top in e.top_logprobs]
    # a stop string inside what a draft made: the text ends where it matched, nothing after it leaks
    full = want.text
    stop = full[len(full) // 2: len(full) // 2 + 3]
    got, want = both(SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, stop=(stop,)))
    assert got.text == want.text and got.finish_reason == want.finish_reason == "stop"
    # n: each choice speculates on its own
    params = [drive.greedy(24), drive.greedy(24)]

    async def choices(engine: Engine) -> list[list[int]]:
        out: list[list[int]] = [[], []]
        async for i, ev in engine.generate_choices(prompt, params):
            out[i].extend(ev.token_ids)
        return out

    assert drive.run(choices(ngram)) == drive.run(choices(off))
    grammar = 'root ::= "def " [a-z_]+ "(" [a-z, ]* "):" [ \\n]+ ("return " [a-z +*]+ "\\n")?'
    got, want = both(SamplingParams(max_tokens=24, temperature=0.0, grammar=grammar))
    assert got.tokens == want.tokens and got.text.startswith("def ")


@pytest.mark.slow
def test_asking_for_speculation_where_the_server_has_none_is_refused(engines) -> None:
    off, ngram = engines
    with pytest.raises(SpeculationUnavailableError):
        off.generate("hi", SamplingParams(max_tokens=2, speculative=True))
    ngram.generate("hi", SamplingParams(max_tokens=2, speculative=True))  # accepted (not started)


# --- the core on its own: llama.cpp's cells against the accounting ------------------------------------------


@pytest.fixture(scope="module")
def spec_core(engine_threads):
    config = _config(n_threads=engine_threads, n_parallel=3, kv_unified=True, spec_type="ngram-simple",
                     spec_seqs_max=2)
    rt = LlamaRuntime(config)
    sent: list[ToFront] = []
    yield EngineCore(rt, config, sent.append), sent
    rt.close()


def _step(core: EngineCore) -> StepOutputs | None:
    assert core._take_input(block=False)
    return core.step()


@pytest.mark.slow
def test_rejected_draft_cells_leave_llama_cpp_and_the_accounting(spec_core) -> None:
    core, _ = spec_core
    text = "alpha beta gamma delta alpha beta gamma delta alpha beta gamma delta alpha beta"
    prompt = tuple(core.rt.tokenize(text))
    core.post(AddRequest(1, prompt, (SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True),)))
    verified = 0
    for _ in range(60):
        if _step(core) is None and not core.scheduler.has_work:
            break
        for req in core.scheduler.running:
            # every cell llama.cpp holds for the sequence is one the accounting knows, and no more
            assert core.rt.seq_pos_max(req.slot) + 1 == req.n_cached == len(req.tokens) - req.n_pending
        verified = core.spec.verified_total if core.spec else 0
    assert verified > 0
    assert core.spec is not None and core.spec.accepted_total < core.spec.drafted_total  # some were rejected
    assert core.stats().kv_used_cells == 0


@pytest.mark.slow
def test_a_batch_over_the_limit_does_not_draft(spec_core) -> None:
    core, _ = spec_core
    assert core.spec is not None
    text = "one two three one two three one two three one two"
    prompt = tuple(core.rt.tokenize(text))
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    skipped = core.spec.skipped_steps_total
    asked = core.scheduler.draft
    assert asked is not None
    calls: list[tuple[int, list[tuple[int, ...]]]] = []

    def recorded(decoders, room):  # type: ignore[no-untyped-def]
        drafts = asked(decoders, room)
        calls.append((len(decoders), drafts))
        return drafts

    core.scheduler.draft = recorded
    core.post(*(AddRequest(10 + i, prompt, (params,)) for i in range(3)))
    try:
        for _ in range(40):
            if _step(core) is None and not core.scheduler.has_work:
                break
    finally:
        core.scheduler.draft = asked
    # three decoding sequences, above spec_seqs_max=2: those steps drafted nothing, and were counted
    crowded = [drafts for n, drafts in calls if n > 2]
    assert crowded and all(d == () for drafts in crowded for d in drafts)
    assert core.spec.skipped_steps_total - skipped == len(crowded)


# --- sampling keeps the target's distribution ---------------------------------------------------------------

DRAWS = 400
SLOTS = 16
SETTINGS: dict[str, object] = {"temperature": 1.0, "top_k": 40}


@pytest.mark.slow
def test_sampled_tokens_after_a_verified_draft_follow_the_target(engine_threads, drive,
                                                                 serial_reference) -> None:
    from tests.engine.test_engine_sampling import chi_square_passes, cpu_chain_distribution

    # every sequence drafts whatever the batch (tokens free, no batch limit); the prompt comes from the cache
    eng = Engine(_config(n_threads=engine_threads, n_ctx=128, n_parallel=SLOTS, spec_type="ngram-simple",
                         spec_seqs_max=SLOTS, spec_token_cost=0.0, prefix_cache=True))
    eng.start()
    text = "The cat sat on the mat. The cat sat on the mat. The cat sat on the mat. The cat sat on the"
    prompt = eng.tokenize(text)

    async def draws() -> list[tuple[int, ...]]:
        out: list[tuple[int, ...]] = []
        for start in range(0, DRAWS, 4 * SLOTS):
            batch = [drive.collect(eng, prompt, SamplingParams(max_tokens=3, seed=s, **SETTINGS))  # type: ignore[arg-type]
                     for s in range(start, min(DRAWS, start + 4 * SLOTS))]
            out.extend(r.tokens for r in await asyncio.gather(*batch))
        return out

    try:
        samples = drive.run(draws())
        stats = eng.stats()
    finally:
        eng.stop()
    assert stats.spec_drafted_total > 0 and stats.spec_accepted_total > 0
    # The second token came from the first row of a verification, the third (where the second matched the
    # draft) from the second row: each must follow the chain's distribution given what came before it.
    a = Counter(s[0] for s in samples).most_common(1)[0][0]
    second = Counter(s[1] for s in samples if s[0] == a)
    b = second.most_common(1)[0][0]
    third = Counter(s[2] for s in samples if s[:2] == (a, b))
    ref = serial_reference(str(smollm2_path()), n_ctx=128)
    try:
        p2 = cpu_chain_distribution(ref._decode([*prompt, a], 0), SETTINGS, [])
        ref.rt.seq_rm(0)
        p3 = cpu_chain_distribution(ref._decode([*prompt, a, b], 0), SETTINGS, [])
    finally:
        ref.close()
    for counts, expected in ((second, p2), (third, p3)):
        n = sum(counts.values())
        assert n >= 80
        ok, detail = chi_square_passes(counts, expected, n)
        assert ok, detail
