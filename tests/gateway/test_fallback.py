"""The fallback chain in-process, over real backends: llama-cpp-python's server in a subprocess as the
primary, edgeserve's embedded engine as the fallback. Primaries are killed with SIGKILL mid-request."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from loadtest.servers import ServerProcess, free_port, metric_value, start_llama_cpp_server
from quantize.bundled import smollm2_path
from quantize.model.units import GIB
from server.engine.config import EngineConfig
from server.engine.types import SamplingParams
from server.gateway.backends.base import BackendError, ContextLengthExceededError, Delta, GenerationJob
from server.gateway.backends.embedded import EmbeddedBackend
from server.gateway.backends.openai_upstream import OpenAIUpstreamBackend
from server.gateway.chain_config import MemberConfig
from server.gateway.fallback import FallbackBackend
from server.gateway.resume import StreamProgress
from server.hardware.available import available_ram

T = TypeVar("T")
FALLBACK_CTX = 512  # tokens per sequence: a pool of 2048 cells for the fallback's four
PRIMARY_CTX = 512


class LoopThread:
    """One event loop in a thread for the whole module, so the embedded engine loads once."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout_s: float = 240.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


@pytest.fixture(scope="module")
def loop() -> Iterator[LoopThread]:
    lt = LoopThread()
    yield lt
    lt.close()


@pytest.fixture(scope="module")
def embedded(loop: LoopThread) -> Iterator[EmbeddedBackend]:
    backend = EmbeddedBackend(EngineConfig(model_path=str(smollm2_path()), n_ctx=FALLBACK_CTX, n_parallel=4))
    loop.run(backend.start())
    yield backend
    loop.run(backend.stop())


class Primary:
    """llama-cpp-python's server, restarted on demand after a test killed it."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.port = free_port()
        self.proc: ServerProcess | None = None
        self.starts = 0

    def ensure(self) -> ServerProcess:
        if self.proc is None or not self.proc.is_alive():
            self.starts += 1
            log_path = self.tmp / f"primary{self.starts}.log"
            self.proc = start_llama_cpp_server(smollm2_path(), self.port, log_path, n_ctx=PRIMARY_CTX)
            if not self.proc.wait_http("/v1/models", 180):
                pytest.fail("llama-cpp-python's server did not start:\n" + "\n".join(self.proc.log_tail()))
        return self.proc

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()


@pytest.fixture(scope="module")
def primary(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Primary]:
    p = Primary(tmp_path_factory.mktemp("primary"))
    yield p
    p.stop()


def chain_of(loop: LoopThread, primary_url: str | None, embedded: EmbeddedBackend, *,
             primary_ctx: int | None = PRIMARY_CTX, health_interval_s: float = 0.5,
             fallback: dict[str, Any] | None = None) -> FallbackBackend:
    members: list[tuple[MemberConfig, Any]] = []
    if primary_url is not None:
        cfg = MemberConfig(name="primary", kind="openai", url=primary_url, n_ctx=primary_ctx,
                           health_url="/v1/models", health_interval_s=health_interval_s,
                           breaker={"failure_threshold": 2, "cooldown_s": 1.0})
        upstream = OpenAIUpstreamBackend(primary_url, n_parallel=cfg.n_parallel, n_ctx=primary_ctx,
                                         health_interval_s=health_interval_s, health_url="/v1/models")
        upstream.name = "primary"
        members.append((cfg, upstream))
    members.append((MemberConfig(name="fallback", kind="embedded", n_ctx=FALLBACK_CTX, **(fallback or {})),
                    embedded))
    chain = FallbackBackend(members)
    loop.run(chain.start())
    return chain


def stop_chain(loop: LoopThread, chain: FallbackBackend) -> None:
    # The embedded engine is shared by the module: stop only the primary's client.
    for m in chain.members:
        if m.name != "fallback" and m.is_started:
            loop.run(m.backend.stop())


def completion(prompt: str, max_tokens: int) -> GenerationJob:
    return GenerationJob(kind="completion", prompt=prompt,
                         params=SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))


async def drain(chain: FallbackBackend, job: GenerationJob, kill_after: int | None = None,
                victim: ServerProcess | None = None) -> tuple[list[Delta], StreamProgress]:
    iterator, progress = chain.stream(job)
    deltas: list[Delta] = []
    async for delta in iterator:
        deltas.append(delta)
        if kill_after is not None and victim is not None and len(deltas) == kill_after:
            victim.kill9()
    return deltas, progress


def metrics_text(chain: FallbackBackend) -> str:
    from prometheus_client import generate_latest

    return generate_latest(chain.metrics.registry).decode()


def assert_one_stream(deltas: list[Delta], max_tokens: int) -> None:
    """One finish at the very end, counts that only grow, and usage summed over every backend."""
    finishes = [d.finish_reason for d in deltas if d.finish_reason is not None]
    assert finishes == ["length"], finishes
    assert deltas[-1].finish_reason == "length"
    counts = [d.completion_tokens for d in deltas]
    assert counts == sorted(counts), counts
    assert deltas[-1].completion_tokens == max_tokens
    assert deltas[-1].prompt_tokens > 0


def test_refused_connection_before_output_is_retried_unseen(loop: LoopThread, primary: Primary,
                                                            embedded: EmbeddedBackend) -> None:
    proc = primary.ensure()
    # A slow health poll: the chain still believes in the primary when the request arrives after its death.
    chain = chain_of(loop, proc.url, embedded, health_interval_s=60.0)
    try:
        assert chain.members[0].is_available()
        proc.kill9()
        deltas, progress = loop.run(drain(chain, completion("The capital of France is", 12)))
        assert_one_stream(deltas, 12)
        segments = [(s.backend, s.finished) for s in progress.segments]
        assert segments == [("primary", False), ("fallback", True)]
        assert progress.segments[0].completion_tokens == 0
        text = metrics_text(chain)
        assert metric_value(text, "edgeserve_fallbacks_total", from_backend="primary", to_backend="fallback",
                            phase="before_output") == 1
        assert metric_value(text, "edgeserve_backend_failures_total", backend="primary",
                            reason="unavailable") == 1
    finally:
        stop_chain(loop, chain)


def test_stream_broken_after_output_resumes_as_one_stream(loop: LoopThread, primary: Primary,
                                                          embedded: EmbeddedBackend) -> None:
    proc = primary.ensure()
    chain = chain_of(loop, proc.url, embedded)
    max_tokens = 24
    job = completion("Once upon a time, in a small village,", max_tokens)
    try:
        deltas, progress = loop.run(drain(chain, job, kill_after=4, victim=proc))
    finally:
        stop_chain(loop, chain)
    assert_one_stream(deltas, max_tokens)
    first, second = progress.segments
    assert (first.backend, first.finished) == ("primary", False)
    assert (second.backend, second.finished) == ("fallback", True)
    assert first.completion_tokens >= 4
    assert first.completion_tokens + second.completion_tokens == max_tokens
    text = "".join(d.text for d in deltas)
    sent_before, resumed = text[: first.chars], text[first.chars:]
    # The fallback continued exactly where the client was: its part equals what the engine generates on its
    # own for prompt + the text already sent, with the tokens that were left.
    reference_job = dataclasses.replace(job, continuation=sent_before, params=dataclasses.replace(
        job.params, max_tokens=max_tokens - first.completion_tokens))

    async def alone() -> str:
        return "".join([d.text async for d in embedded.generate(reference_job)])

    assert resumed == loop.run(alone())
    assert metric_value(metrics_text(chain), "edgeserve_fallbacks_total", phase="mid_stream") == 1


def test_long_prompt_goes_to_the_backend_whose_context_fits(loop: LoopThread, primary: Primary,
                                                             embedded: EmbeddedBackend) -> None:
    proc = primary.ensure()
    chain = chain_of(loop, proc.url, embedded, primary_ctx=128)
    try:
        prompt = "The quick brown fox jumps over the lazy dog. " * 20  # ~200 tokens: over 128, under 512
        job = completion(prompt, 4)
        assert chain.count_prompt_tokens(job) is not None
        deltas, progress = loop.run(drain(chain, job))
        assert [s.backend for s in progress.segments] == ["fallback"]
        assert deltas[-1].finish_reason == "length"

        too_long = completion("The quick brown fox jumps over the lazy dog. " * 250, 4)  # ~2500 tokens
        with pytest.raises(ContextLengthExceededError):
            loop.run(drain(chain, too_long))
        text = metrics_text(chain)
        assert metric_value(text, "edgeserve_backend_attempts_total", backend="primary") == 0
        assert metric_value(text, "edgeserve_chain_refused_total", reason="context_length") == 1
    finally:
        stop_chain(loop, chain)


def test_backend_that_cannot_fit_is_left_out_with_the_reason(loop: LoopThread,
                                                             embedded: EmbeddedBackend) -> None:
    # 256 sequences of SmolLM2's whole 8192-token context: a KV cache of about 45 GiB, refused before
    # anything is allocated.
    config = EngineConfig(model_path=str(smollm2_path()), n_ctx=8192, n_parallel=256)
    ram = available_ram()
    if ram is None or ram.free_bytes > 40 * GIB:
        pytest.skip("free RAM unknown, or enough for a 45 GiB KV cache")
    impossible = EmbeddedBackend(config)
    impossible.name = "primary"
    members = [(MemberConfig(name="primary", kind="embedded", n_ctx=8192, n_parallel=256), impossible),
               (MemberConfig(name="fallback", kind="embedded", n_ctx=FALLBACK_CTX), embedded)]
    chain = FallbackBackend(members)
    loop.run(chain.start())
    primary_member = chain.members[0]
    assert not primary_member.is_started and primary_member.start_error
    assert "does not fit" in primary_member.start_error
    assert chain.member_states()["primary"].startswith("out: does not fit")
    assert primary_member.breaker.state == "open"
    assert chain.is_ready()
    deltas, progress = loop.run(drain(chain, completion("Hello, my name is", 6)))
    assert deltas[-1].finish_reason == "length" and deltas[-1].completion_tokens == 6
    assert [s.backend for s in progress.segments] == ["fallback"]
    text = metrics_text(chain)
    assert metric_value(text, "edgeserve_backend_failures_total", backend="primary") == 1
    assert metric_value(text, "edgeserve_breaker_state", backend="primary") >= 1


def test_full_queue_is_429_and_a_long_wait_is_408(loop: LoopThread, embedded: EmbeddedBackend) -> None:
    members = [(MemberConfig(name="fallback", kind="embedded", n_ctx=FALLBACK_CTX, n_parallel=1, queue_size=1,
                             queue_timeout_s=0.3), embedded)]
    chain = FallbackBackend(members)
    loop.run(chain.start())

    async def outcome(job: GenerationJob) -> BaseException | list[Delta]:
        try:
            return (await drain(chain, job))[0]
        except BackendError as exc:
            return exc

    async def scenario() -> tuple[BaseException | list[Delta], BaseException | list[Delta], list[Delta]]:
        holder, _ = chain.stream(completion("Count from one to ten:", 8))
        first = [await anext(holder)]  # the stream is open and not read on: it keeps the one slot
        waiting = asyncio.ensure_future(outcome(completion("Hi", 2)))
        await asyncio.sleep(0.05)  # let it take the one queue place
        refused = await outcome(completion("Hi", 2))
        timed_out = await waiting
        first += [d async for d in holder]
        return refused, timed_out, first

    refused, timed_out, first = loop.run(scenario())
    assert isinstance(refused, BackendError) and refused.status_code == 429 and refused.code == "queue_full"
    assert isinstance(timed_out, BackendError) and timed_out.status_code == 408
    assert timed_out.code == "queue_timeout"
    assert first[-1].finish_reason == "length" and first[-1].completion_tokens == 8
