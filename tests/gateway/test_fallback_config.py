"""The chain file (YAML through pydantic-settings: members are EngineConfigs plus their limits) and the pure
resume arithmetic."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.engine.chat_template import ChatTemplate
from server.engine.types import SamplingParams
from server.gateway.backends.base import Delta, GenerationJob
from server.gateway.chain_config import ChainConfigError, MemberConfig, build_member_backend, load_chain
from server.gateway.resume import StreamProgress, as_completion, clamp_to_context, continuation_job

ROOT = Path(__file__).resolve().parents[2]


def test_example_config_loads() -> None:
    chain = load_chain(ROOT / "server" / "gateway" / "chain.example.yaml")
    assert [b.name for b in chain.backends] == ["gpu", "cpu"]
    gpu, cpu = chain.backends
    assert gpu.kind == "openai" and gpu.url == "http://127.0.0.1:8080" and gpu.breaker.failure_threshold == 3
    assert cpu.kind == "embedded" and cpu.n_gpu_layers == 0
    assert cpu.capacity == cpu.n_parallel + cpu.queue_size


def test_environment_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "chain.yaml"
    path.write_text("model_name: from-file\nbackends:\n  - {name: a, kind: embedded}\n")
    monkeypatch.setenv("EDGESERVE_CHAIN_MODEL_NAME", "from-env")
    assert load_chain(path).model_name == "from-env"


@pytest.mark.parametrize(("text", "needle"), [
    ("backends: []\n", "backends"),
    ("backends:\n  - {name: a, kind: openai}\n", "needs url"),
    ("backends:\n  - {name: a, kind: embedded}\n  - {name: a, kind: embedded}\n", "unique"),
    ("backends:\n  - {name: a, kind: embedded, n_parallel: 0}\n", "n_parallel"),
    ("backends:\n  - {name: a, kind: embedded, colour: red}\n", "colour"),
    ("backends:\n  - {name: a, kind: quantum}\n", "kind"),
])
def test_bad_files_name_the_problem_and_the_file(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "chain.yaml"
    path.write_text(text)
    with pytest.raises(ChainConfigError) as info:
        load_chain(path)
    assert needle in str(info.value) and str(path) in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ChainConfigError, match="not found"):
        load_chain(tmp_path / "nope.yaml")


def test_old_slots_key_reads_as_n_parallel(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "chain.yaml"
    path.write_text("backends:\n  - {name: a, kind: embedded, slots: 3}\n")
    with caplog.at_level("WARNING", logger="server.gateway.chain_config"):
        member = load_chain(path).backends[0]
    assert member.n_parallel == 3
    assert any("'slots' is deprecated, use 'n_parallel'" in r.message for r in caplog.records)


def test_every_engine_setting_reaches_an_embedded_member(tmp_path: Path) -> None:
    path = tmp_path / "chain.yaml"
    path.write_text("backends:\n  - {name: cpu, kind: embedded, n_ctx: 1024, n_parallel: 2, kv_type: q8_0,"
                    " flash_attn: 'on', kv_unified: true, n_threads: 1, n_batch: 64, n_ubatch: 32}\n")
    member = load_chain(path).backends[0]
    config = build_member_backend(member).config  # type: ignore[attr-defined]
    assert (config.n_ctx, config.n_parallel, config.n_ctx_total) == (1024, 2, 2048)
    assert (config.kv_type, config.flash_attn, config.kv_unified) == ("q8_0", "on", True)
    assert (config.n_threads, config.n_batch, config.n_ubatch) == (1, 64, 32)


def test_an_openai_member_without_n_ctx_takes_the_upstreams() -> None:
    given = MemberConfig(name="gpu", kind="openai", url="http://127.0.0.1:9", n_ctx=8192)
    assert given.n_ctx_given == 8192
    assert MemberConfig(name="gpu", kind="openai", url="http://127.0.0.1:9").n_ctx_given is None


@pytest.mark.slow
def test_an_embedded_members_n_ctx_is_per_sequence() -> None:
    # Bug: MemberConfig.n_ctx was documented per sequence but handed to the engine as the whole pool, so the
    # example's CPU member (n_ctx 4096, 4 slots) gave a sequence 1024 tokens.
    import asyncio

    cpu = load_chain(ROOT / "server" / "gateway" / "chain.example.yaml").backends[1]
    assert (cpu.n_ctx, cpu.n_parallel) == (4096, 4)
    backend = build_member_backend(cpu.model_copy(update={"n_threads": 1}))
    asyncio.run(backend.start())
    try:
        assert backend.n_ctx == 4096
    finally:
        asyncio.run(backend.stop())


def job(max_tokens: int = 10, kind: str = "completion") -> GenerationJob:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    if kind == "chat":
        return GenerationJob(kind="chat", params=params, messages=({"role": "user", "content": "hi"},))
    return GenerationJob(kind="completion", params=params, prompt="Once")


def test_progress_sums_usage_over_backends() -> None:
    progress = StreamProgress()
    progress.begin("primary")
    assert progress.absorb(Delta("a", prompt_tokens=7, completion_tokens=1)).completion_tokens == 1
    assert progress.absorb(Delta("b", prompt_tokens=7, completion_tokens=2)).completion_tokens == 2
    progress.abandon()
    resumed = continuation_job(job(10), progress)
    assert resumed is not None
    assert resumed.continuation == "ab" and resumed.params.max_tokens == 8
    assert resumed.extra["max_tokens_explicit"] is True
    progress.begin("fallback")
    # The fallback counts its own prompt (original + continuation) and its own tokens from one.
    out = progress.absorb(Delta("c", prompt_tokens=9, completion_tokens=1))
    assert (out.prompt_tokens, out.completion_tokens) == (7, 3)
    last = progress.absorb(Delta("", finish_reason="length", prompt_tokens=9, completion_tokens=8))
    assert (last.prompt_tokens, last.completion_tokens, last.finish_reason) == (7, 10, "length")
    assert [(s.backend, s.completion_tokens, s.finished) for s in progress.segments] == [
        ("primary", 2, False), ("fallback", 8, True)]
    assert progress.text == "abc"


def test_nothing_sent_means_a_plain_retry() -> None:
    progress = StreamProgress()
    progress.begin("primary")
    progress.abandon()
    assert not progress.has_output
    original = job(5)
    assert continuation_job(original, progress) is original


def test_budget_used_up_ends_with_length() -> None:
    progress = StreamProgress()
    progress.begin("primary")
    progress.absorb(Delta("x" * 5, prompt_tokens=3, completion_tokens=5))
    progress.abandon()
    assert continuation_job(job(5), progress) is None
    assert progress.length_finish() == Delta("", finish_reason="length", prompt_tokens=3, completion_tokens=5)


def test_clamp_to_context() -> None:
    original = job(100)
    assert clamp_to_context(original, prompt_tokens=20, n_ctx=512) is original
    clamped = clamp_to_context(original, prompt_tokens=500, n_ctx=512)
    assert clamped is not None and clamped.params.max_tokens == 12
    assert clamp_to_context(original, prompt_tokens=512, n_ctx=512) is None


def test_chat_as_completion_keeps_the_continuation_separate() -> None:
    template = ChatTemplate("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
                            "{% if add_generation_prompt %}<assistant>{% endif %}")
    chat = GenerationJob(kind="chat", params=SamplingParams(max_tokens=4), continuation="Hel",
                         messages=({"role": "user", "content": "hi"},))
    text = as_completion(chat, template)
    assert (text.kind, text.prompt, text.continuation, text.messages) == ("completion", "<user>hi<assistant>",
                                                                           "Hel", ())


def test_supervisor_ladder_steps_become_records(tmp_path: Path) -> None:
    import asyncio
    import json

    from server.gateway.reliability_metrics import watch_supervisors
    from server.launch.plan import StepTaken

    status = tmp_path / "gpu.status.json"
    steps = [StepTaken(step=1, rung="context", setting="n_ctx", old=32768, new=16384, why="halve")]
    dumped = [s.model_dump(mode="json") for s in steps]
    status.write_text(json.dumps({"state": "starting", "ladder_steps": dumped}))
    records: list[tuple[str, str, str]] = []

    async def watch() -> None:
        task = asyncio.create_task(watch_supervisors({"gpu": status}, lambda *r: records.append(r), 0.01))
        while not records:
            await asyncio.sleep(0.01)
        steps.append(StepTaken(step=2, rung="parallel", setting="n_parallel", old=8, new=4, why="halve"))
        status.write_text(json.dumps({"ladder_steps": [s.model_dump(mode="json") for s in steps]}))
        while len(records) < 2:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)  # a few more polls see nothing new
        task.cancel()

    asyncio.run(asyncio.wait_for(watch(), 10))
    assert [(b, rung) for b, rung, _ in records] == [("gpu", "context"), ("gpu", "parallel")]
    assert "n_ctx 32768 -> 16384" in records[0][2]
