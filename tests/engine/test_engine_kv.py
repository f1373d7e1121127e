"""The engine under memory pressure and with long prompts: a tiny unified KV cache and a small step budget.

Every step here stays on llama.cpp's per-row CPU attention path (steps under 64 tokens, under 512 cells),
where a sequence's logits do not depend on what else shares the step: so preemption and chunked prefill must
give exactly the serial greedy tokens.
"""

from __future__ import annotations

import asyncio

import gguf
import pytest

from quantize.bundled import smollm2_path
from quantize.synthetic import write_synthetic_gguf
from server.engine.detokenizer import IncrementalDetokenizer
from server.engine.engine import Engine, EngineConfig
from server.engine.errors import EngineNotReadyError, EngineStoppedError, ModelLoadError
from server.engine.types import SamplingParams, StreamEvent

N_BATCH = 32
LONG_TEXT = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk, carrying a small brass lamp "
    "and a notebook in which he recorded the weather, the ships that passed, and the birds that rested on "
    "the rail. Over thirty years the notebook grew into a shelf of notebooks, and the shelf into a small "
    "library that the village school visited each spring. Summarize this story in one sentence."
)


# The budget the scheduler of `tight` gets: a 256-cell pool shared by four sequences of up to 256 tokens.
TIGHT_KV_CELLS = 256


@pytest.fixture(scope="module")
def tight(engine_threads):
    eng = Engine(EngineConfig(model_path=str(smollm2_path()), n_ctx=256, n_parallel=4, n_batch=N_BATCH,
                              n_ubatch=N_BATCH, n_threads=engine_threads, kv_unified=True, flash_attn="on",
                              # A sequence may use n_ctx tokens and the unified pool is n_ctx x n_parallel
                              # cells, so sequences alone never outgrow it from a configuration; preemption is
                              # the safety net for a pool that runs short anyway. The scheduler gets a smaller
                              # budget than llama.cpp's cache so that the net is exercised.
                              kv_cells_override=TIGHT_KV_CELLS, core="thread"))
    eng.start()
    yield eng
    eng.stop()


@pytest.fixture(scope="module")
def reference(serial_reference):
    ref = serial_reference(str(smollm2_path()), n_ctx=512, flash_attn="on")
    yield ref
    ref.close()


def chat(engine: Engine, text: str) -> list[int]:
    return engine.tokenize(engine.apply_chat_template([{"role": "user", "content": text}]))


def test_kv_exhaustion_preempts_and_every_sequence_completes(tight: Engine, questions, drive) -> None:
    # Not compared with the serial reference token for token: with one pool shared by four sequences,
    # llama.cpp's CPU kernels gave logits up to 0.3 apart from one sequence alone on an AMD EPYC (greedy
    # tokens then part ways, with or without flash attention, before any preemption, and with the engine
    # before the core had a process of its own too). What a preemption must keep is checked exactly: every
    # token streamed before it, the count, the text.
    prompts = [chat(tight, q) for q in questions[:4]]
    max_tokens = 60
    assert sum(len(p) + max_tokens for p in prompts) > tight.stats().kv_total_cells  # cannot all fit
    before = tight.stats().preemptions_total

    async def together() -> list:
        return list(await asyncio.gather(*(drive.collect(tight, p, drive.greedy(max_tokens, ignore_eos=True))
                                           for p in prompts)))

    results = drive.run(together())
    stats = tight.stats()
    assert stats.preemptions_total > before
    assert [r.finish_reason for r in results] == ["length"] * 4
    assert [len(r.tokens) for r in results] == [max_tokens] * 4
    for r in results:  # what was streamed before a preemption is kept: the text is exactly the tokens' text
        assert r.text == tight.detokenize(list(r.tokens))
        assert [e.completion_tokens for e in r.events] == list(range(1, max_tokens + 1))
    assert stats.running == 0 and stats.kv_used_cells == 0


def test_long_prompt_is_prefilled_in_chunks_while_others_decode(
    tight: Engine, reference, questions, drive
) -> None:
    long_prompt = chat(tight, LONG_TEXT)
    short_prompt = chat(tight, questions[0])
    assert len(long_prompt) > 3 * N_BATCH
    expected = reference.generate(long_prompt, 16, ignore_eos=True, chunk=N_BATCH)
    steps: list[tuple[int, int]] = []
    tight.on_step = lambda tokens, seqs: steps.append((tokens, seqs))
    order: list[str] = []

    async def consume(name: str, prompt: list[int], params: SamplingParams, started: asyncio.Event | None,
                      ) -> list[StreamEvent]:
        events = []
        async for ev in tight.generate(prompt, params):
            order.append(name)
            events.append(ev)
            if started is not None:
                started.set()
        return events

    async def scenario() -> list[StreamEvent]:
        started = asyncio.Event()
        short = asyncio.create_task(
            consume("short", short_prompt, drive.greedy(40, ignore_eos=True), started))
        await started.wait()
        long_events = await consume("long", long_prompt, drive.greedy(16, ignore_eos=True), None)
        await short
        return long_events

    try:
        long_events = drive.run(scenario())
    finally:
        tight.on_step = None
    assert tuple(t for e in long_events for t in e.token_ids) == expected
    assert max(tokens for tokens, _ in steps) <= N_BATCH
    # the short sequence kept decoding while the long prompt went through in several chunks
    first_long = order.index("long")
    assert order[:first_long].count("short") >= len(long_prompt) // N_BATCH


def test_real_vocabulary_multibyte_characters_are_never_split(tight: Engine) -> None:
    text = "Emoji 🙂🚀, accents café, 日本語 text"
    ids = tight.tokenize(text, add_special=False)
    vocab = tight.vocabulary
    pieces = [vocab.piece(t) for t in ids]
    split = [p for p in pieces if not _is_utf8(p)]
    assert split, "the test needs a character whose bytes span several tokens"
    detok = IncrementalDetokenizer(vocab.piece)
    deltas = [detok.push(t) for t in ids]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) + detok.flush() == text


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _vocab_without_chat_template(src: str, dst: str) -> None:
    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(dst, "llama")
    for field in reader.fields.values():
        if field.name.startswith("tokenizer.") and field.name != "tokenizer.chat_template":
            vtype = field.types[0]
            sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    """A 1-layer random-weight model with SmolLM2's tokenizer but no chat template."""
    tmp = tmp_path_factory.mktemp("tiny")
    vocab = tmp / "vocab.gguf"
    _vocab_without_chat_template(str(smollm2_path()), str(vocab))
    model = write_synthetic_gguf(tmp / "no-template.gguf", vocab_from=vocab, n_layer=1, n_embd=64,
                                 n_head=2, n_head_kv=1, n_ff=128)
    return str(model)


def _tiny_engine(path: str) -> Engine:
    # 256 tokens per sequence, 512 cells for the two
    return Engine(EngineConfig(model_path=path, n_ctx=256, n_parallel=2, n_batch=64, n_ubatch=64))


def test_model_without_chat_template_uses_chatml(tiny_model: str, drive) -> None:
    engine = _tiny_engine(tiny_model)
    engine.start()
    try:
        assert engine.chat_template.is_fallback
        prompt = engine.apply_chat_template([{"role": "user", "content": "Hi"}])
        assert prompt == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
        result = drive.run(drive.collect(engine, prompt, params))
        assert len(result.tokens) == 4 and result.finish_reason == "length"
    finally:
        engine.stop()


def test_stop_ends_streams_in_flight_and_refuses_new_work(tiny_model: str, drive) -> None:
    engine = _tiny_engine(tiny_model)
    engine.start()
    received: list[StreamEvent] = []

    async def interrupted() -> None:
        with pytest.raises(EngineStoppedError):
            async for event in engine.generate("Hello", SamplingParams(max_tokens=200, ignore_eos=True)):
                received.append(event)
                engine.stop()

    drive.run(interrupted())
    assert received and received[-1].finish_reason is None
    assert not engine.is_ready
    with pytest.raises(EngineNotReadyError):
        engine.generate("Hello", SamplingParams(max_tokens=4))


def test_missing_model_fails_to_load(tmp_path) -> None:
    engine = Engine(EngineConfig(model_path=str(tmp_path / "missing.gguf")))
    with pytest.raises(ModelLoadError, match=r"missing\.gguf"):
        engine.start()
    background = Engine(EngineConfig(model_path=str(tmp_path / "missing.gguf")))
    background.start(wait=False)
    assert not background.wait_ready(timeout=30)
    assert isinstance(background.load_error, ModelLoadError)
    with pytest.raises(EngineNotReadyError, match="failed to load"):
        background.generate("Hello", SamplingParams())
    background.stop()


def test_shared_prompt_prefix_is_reused_across_slots(tight: Engine, reference, questions, drive) -> None:
    system = "You are a terse assistant who answers in five words or fewer."
    prompts = [tight.tokenize(tight.apply_chat_template([{"role": "system", "content": system},
                                                         {"role": "user", "content": q}]))
               for q in questions[4:7]]
    shared = 0
    while all(p[shared] == prompts[0][shared] for p in prompts):
        shared += 1
    expected = [reference.generate(p, 8, ignore_eos=True, chunk=N_BATCH) for p in prompts]
    # leaves the prefix cached in an idle slot
    drive.run(drive.collect(tight, prompts[0], drive.greedy(8, ignore_eos=True)))
    before = tight.stats().prefix_reused_tokens_total

    async def together() -> list:
        return list(await asyncio.gather(*(drive.collect(tight, p, drive.greedy(8, ignore_eos=True))
                                           for p in prompts[1:])))

    results = drive.run(together())
    assert [r.tokens for r in results] == expected[1:]
    # both took the shared part from the cache: one from the idle slot, the other copied from a running slot
    assert tight.stats().prefix_reused_tokens_total - before >= 2 * shared
