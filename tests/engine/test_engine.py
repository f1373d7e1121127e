"""The continuous-batching engine against the real llama.cpp on the CPU with the bundled SmolLM2."""

from __future__ import annotations

import asyncio
import time

import pytest

from quantize.bundled import smollm2_path
from server.engine.engine import Engine, EngineConfig, PromptTooLongError
from server.engine.errors import EmptyPromptError
from server.engine.types import SamplingParams

MAX_TOKENS = 24


# The CPU's own way (events before the next step, sampling on the host) with the core in a thread of this
# process, and a GPU's (sampler chains inside the decode graph, outputs while the next step runs) with the
# core in a process of its own, both run here on the CPU.
@pytest.fixture(scope="module", params=[(False, False, "thread"), (True, True, "process")],
                ids=["host", "in_graph_overlap"])
def engine(request: pytest.FixtureRequest, engine_threads):
    backend_sampling, overlap, core = request.param
    # 512 tokens per sequence: a pool of 4096 cells for the eight
    eng = Engine(EngineConfig(model_path=str(smollm2_path()), n_ctx=512, n_parallel=8, n_batch=512,
                              n_threads=engine_threads, backend_sampling=backend_sampling, overlap=overlap,
                              kv_unified=False,  # a cache per sequence: greedy output independent of load
                              core=core))
    eng.start()
    yield eng
    eng.stop()


@pytest.fixture(scope="module")
def prompts(engine: Engine, questions) -> list[list[int]]:
    return [engine.tokenize(engine.apply_chat_template([{"role": "user", "content": q}])) for q in questions]


@pytest.fixture(scope="module")
def serial(prompts: list[list[int]], serial_reference) -> list[tuple[int, ...]]:
    ref = serial_reference(str(smollm2_path()))
    try:
        return [ref.generate(p, MAX_TOKENS) for p in prompts]
    finally:
        ref.close()


def test_greedy_alone_equals_among_seven_others_equals_serial(engine: Engine, prompts, serial, drive) -> None:
    alone = drive.run(drive.collect(engine, prompts[0], drive.greedy(MAX_TOKENS)))

    async def together() -> list:
        return list(await asyncio.gather(*(drive.collect(engine, p, drive.greedy(MAX_TOKENS))
                                           for p in prompts)))

    batched = drive.run(together())
    assert alone.tokens == serial[0]
    assert batched[0].tokens == alone.tokens
    assert [r.tokens for r in batched] == serial
    shown = alone.tokens[:-1] if alone.finish_reason == "stop" else alone.tokens
    assert batched[0].text == alone.text == engine.detokenize(list(shown))
    assert "Red" in alone.text  # the model really answers "Name three colors."


def test_eight_concurrent_requests_share_steps(engine: Engine, prompts, drive) -> None:
    seen: list[tuple[int, int]] = []
    engine.on_step = lambda tokens, seqs: seen.append((tokens, seqs))
    try:
        async def together() -> list:
            return list(await asyncio.gather(*(drive.collect(engine, p, drive.greedy(16)) for p in prompts)))

        results = drive.run(together())
    finally:
        engine.on_step = None
    assert all(r.finish_reason in ("stop", "length") for r in results)
    assert max(seqs for _, seqs in seen) == len(prompts)
    assert engine.stats().max_step_seqs > 1
    # one step for the 8 prompts together, then shared decode steps: far fewer steps than tokens generated
    generated = sum(len(r.tokens) for r in results)
    assert len(seen) < generated


def test_usage_counts_and_finish_length(engine: Engine, prompts, drive) -> None:
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    result = drive.run(drive.collect(engine, prompts[1], params))
    last = result.events[-1]
    assert result.finish_reason == "length"
    assert last.completion_tokens == 3 == len(result.tokens)
    assert last.prompt_tokens == len(prompts[1])


def test_cancel_frees_slot_and_kv_within_a_step(engine: Engine, prompts, drive) -> None:
    before = engine.stats()

    async def cancel_early() -> int:
        gen = engine.generate(prompts[2], SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True))
        async for _ in gen:
            break
        steps_at_cancel = engine.stats().steps_total
        await gen.aclose()
        return steps_at_cancel

    steps_at_cancel = drive.run(cancel_early())
    deadline = time.monotonic() + 30
    while engine.stats().running and time.monotonic() < deadline:
        time.sleep(0.01)
    after = engine.stats()
    assert after.running == 0 and after.waiting == 0
    assert after.kv_used_cells == 0
    assert after.requests_cancelled_total == before.requests_cancelled_total + 1
    # the step in flight when the cancel arrived may finish (and one more may have begun between reading the
    # counter and closing the stream); then the sequence is gone
    assert after.steps_total <= steps_at_cancel + 2


def test_task_cancellation_is_a_disconnect(engine: Engine, prompts, drive) -> None:
    async def consume_then_cancel() -> None:
        started = asyncio.Event()

        async def consume() -> None:
            async for _ in engine.generate(prompts[3], SamplingParams(max_tokens=400, temperature=0.0,
                                                                      ignore_eos=True)):
                started.set()

        task = asyncio.create_task(consume())
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    before = engine.stats().requests_cancelled_total
    drive.run(consume_then_cancel())
    deadline = time.monotonic() + 30
    while engine.stats().running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.stats().running == 0
    assert engine.stats().requests_cancelled_total == before + 1


def test_prompt_too_long_raises_before_anything_runs(engine: Engine) -> None:
    limit = engine.n_ctx
    with pytest.raises(PromptTooLongError) as info:
        engine.generate([1] * (limit - 10), SamplingParams(max_tokens=11))
    assert isinstance(info.value, ValueError)
    assert info.value.prompt_tokens == limit - 10
    assert info.value.limit == limit
    with pytest.raises(EmptyPromptError):
        engine.generate([], SamplingParams(max_tokens=1))


def test_stop_string_ends_generation_and_is_not_sent(engine: Engine, prompts, serial, drive) -> None:
    full = engine.detokenize(list(serial[0]))
    assert "Blue" in full
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, stop=("Blue",))
    result = drive.run(drive.collect(engine, prompts[0], params))
    assert result.finish_reason == "stop"
    assert result.text == full[: full.index("Blue")]
    # held-back prefixes of a stop string that does not complete are released
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, stop=("Bluebird",))
    result = drive.run(drive.collect(engine, prompts[0], params))
    assert "Blue" in result.text


def test_prefix_reuse_keeps_output(engine: Engine, prompts, serial, drive) -> None:
    before = engine.stats().prefix_reused_tokens_total
    again = drive.run(drive.collect(engine, prompts[5], drive.greedy(MAX_TOKENS)))
    assert again.tokens == serial[5]
    assert engine.stats().prefix_reused_tokens_total > before


def test_seeded_sampling_is_reproducible(engine: Engine, prompts, drive) -> None:
    params = SamplingParams(max_tokens=20, temperature=0.9, top_p=0.95, top_k=40, seed=1234, ignore_eos=True)
    first = drive.run(drive.collect(engine, prompts[4], params))

    async def among_others() -> list:
        return list(await asyncio.gather(drive.collect(engine, prompts[4], params),
                                         *(drive.collect(engine, p, drive.greedy(8)) for p in prompts[:3])))

    second = drive.run(among_others())[0]
    assert first.tokens == second.tokens
    assert len(first.tokens) == 20


def test_many_sampled_sequences_in_one_step_match_their_solo_runs(engine: Engine, prompts, drive) -> None:
    # enough chain-sampled outputs per step to take the parallel sampling path
    params = [SamplingParams(max_tokens=12, temperature=0.8, top_k=50, seed=100 + i, ignore_eos=True)
              for i in range(6)]
    solo = [drive.run(drive.collect(engine, prompts[i], params[i])).tokens for i in range(6)]

    async def together() -> list:
        return list(await asyncio.gather(*(drive.collect(engine, prompts[i], params[i]) for i in range(6))))

    assert [r.tokens for r in drive.run(together())] == solo


def test_penalties_run_in_the_chain(engine: Engine, prompts, drive) -> None:
    params = SamplingParams(max_tokens=16, temperature=0.0, repeat_penalty=1.3, frequency_penalty=0.5,
                            presence_penalty=0.5, min_p=0.05)
    result = drive.run(drive.collect(engine, prompts[6], params))
    assert result.finish_reason in ("stop", "length")
    assert result.text


def test_logprobs_of_greedy_tokens(engine: Engine, prompts, drive) -> None:
    params = SamplingParams(max_tokens=5, temperature=0.0, logprobs=3)
    result = drive.run(drive.collect(engine, prompts[1], params))
    for event in result.events:
        assert len(event.logprobs) == len(event.token_ids) == 1
        assert event.logprobs[0] <= 0.0
        (top,) = event.top_logprobs
        assert len(top) == 3
        assert top[0][0] == event.token_ids[0]  # greedy picked the most likely token
        assert top[0][1] == pytest.approx(event.logprobs[0])
        assert top[0][1] >= top[1][1] >= top[2][1]


def test_text_prompt_and_token_prompt_agree(engine: Engine, drive) -> None:
    text = "The capital of France is"
    by_text = drive.run(drive.collect(engine, text, drive.greedy(6)))
    by_ids = drive.run(drive.collect(engine, engine.tokenize(text), drive.greedy(6)))
    assert by_text.tokens == by_ids.tokens
    assert by_text.events[-1].prompt_tokens == len(engine.tokenize(text))


def test_chat_template_of_smollm2(engine: Engine) -> None:
    template = engine.chat_template
    assert not template.is_fallback
    text = engine.apply_chat_template([{"role": "system", "content": "Be brief."},
                                       {"role": "user", "content": [{"type": "text", "text": "Hi"}]}])
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                    "<|im_start|>assistant\n")
    ids = engine.tokenize(text)
    assert engine.tokenize("<|im_start|>", add_special=False) == [ids[0]]  # special tokens parsed as such


def test_stats_are_consistent(engine: Engine) -> None:
    stats = engine.stats()
    assert stats.is_ready and stats.n_slots == 8
    assert stats.kv_total_cells >= 4096
    assert stats.kv_used_cells + stats.kv_cached_cells <= stats.kv_total_cells
    assert stats.steps_total > 0 and stats.step_tokens_total >= stats.steps_total
    assert stats.generated_tokens_total > 0
