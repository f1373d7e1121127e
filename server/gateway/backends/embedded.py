"""The embedded backend: edgeserve's continuous-batching engine over llama.cpp, in this process."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator

from server.engine.config import EngineConfig
from server.engine.engine import Engine
from server.engine.errors import (
    EmptyPromptError,
    EngineError,
    EngineNotReadyError,
    EngineStoppedError,
    InvalidTokenError,
    PromptTooLongError,
)
from server.engine.types import StreamEvent
from server.gateway.backends.base import (
    BackendError,
    BackendStats,
    BackendUnavailableError,
    ContextLengthExceededError,
    Delta,
    GenerationJob,
    TokenLogprob,
)
from server.gateway.settings import GatewaySettings

log = logging.getLogger(__name__)


class EmbeddedBackend:
    """Runs jobs on an in-process Engine. `start()` loads the model off the event loop."""

    name = "embedded"

    def __init__(self, config: EngineConfig, model_id: str | None = None) -> None:
        self.config = config
        self.model_id = model_id or config.model_file().stem
        self._engine: Engine | None = None
        self._batch_size_steps: dict[int, int] = {}
        self._step_tokens_steps: dict[int, int] = {}

    @classmethod
    def from_settings(cls, settings: GatewaySettings) -> EmbeddedBackend:
        """The engine exactly as the settings describe it: its config is taken whole, not rebuilt."""
        return cls(settings.engine, model_id=settings.model_name)

    # --- Backend protocol -----------------------------------------------------------------------------------

    @property
    def n_ctx(self) -> int:
        return self._engine.n_ctx if self._engine is not None else 0

    @property
    def slots(self) -> int:
        return self._engine.n_slots if self._engine is not None else self.config.n_parallel

    def is_ready(self) -> bool:
        return self._engine is not None and self._engine.is_ready

    async def start(self) -> None:
        engine = Engine(self.config, on_step=self._on_step)
        # Loading reads the whole model: seconds for a big one, so not on the event loop.
        await asyncio.to_thread(engine.start)
        self._engine = engine

    async def stop(self) -> None:
        if self._engine is not None:
            engine, self._engine = self._engine, None
            await asyncio.to_thread(engine.stop)

    def _render(self, job: GenerationJob) -> str:
        assert self._engine is not None
        if job.kind == "chat":
            return self._engine.apply_chat_template(list(job.messages)) + job.continuation
        return job.prompt + job.continuation

    def count_prompt_tokens(self, job: GenerationJob) -> int | None:
        if self._engine is None:
            return None
        return len(self._engine.tokenize(self._render(job)))

    def generate(self, job: GenerationJob) -> AsyncIterator[Delta]:
        return self._generate(job)

    async def _generate(self, job: GenerationJob) -> AsyncIterator[Delta]:
        engine = self._engine
        if engine is None or not engine.is_ready:
            raise BackendUnavailableError("the embedded engine is not loaded")
        param = "messages" if job.kind == "chat" else "prompt"
        try:
            prompt = self._render(job)
        except Exception as exc:  # a chat template that rejects these messages (roles out of order, ...)
            raise BackendError(f"cannot render the chat template: {exc}", status_code=400,
                               code="invalid_request_error", retryable=False, param="messages") from exc
        want_logprobs = job.params.logprobs is not None
        stream: AsyncIterator[StreamEvent] | None = None
        try:
            params = job.params
            tokens = engine.tokenize(prompt)
            if job.extra.get("max_tokens_explicit") is False:
                # No limit was asked for: generate up to the end of this engine's context window.
                room = engine.n_ctx - len(tokens)
                if room >= 1 and params.max_tokens > room:
                    params = dataclasses.replace(params, max_tokens=room)
            # The engine checks the prompt length when the stream is created, before anything is queued.
            stream = engine.generate(tokens, params)
            async for event in stream:
                yield self._delta(event, want_logprobs)
        except PromptTooLongError as exc:
            raise ContextLengthExceededError(str(exc), param=param) from exc
        except InvalidTokenError as exc:
            raise BackendError(str(exc), status_code=400, code="invalid_request_error", retryable=False,
                               param=exc.where if exc.where == "logit_bias" else param) from exc
        except EmptyPromptError as exc:
            raise BackendError(str(exc), status_code=400, code="invalid_request_error", retryable=False,
                               param=param) from exc
        except EngineNotReadyError as exc:
            raise BackendUnavailableError(str(exc)) from exc
        except EngineStoppedError as exc:
            raise BackendUnavailableError(f"the engine stopped: {exc}") from exc
        except EngineError as exc:
            raise BackendError(str(exc), status_code=500, code="engine_error", retryable=True) from exc
        finally:
            # Closing the engine's stream cancels the sequence and frees its KV within one step.
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()

    def _delta(self, event: StreamEvent, want_logprobs: bool) -> Delta:
        if event.finish_reason == "error":
            raise BackendError(event.text or "the engine failed on this request", status_code=500,
                               code="engine_error", retryable=True)
        logprobs: tuple[TokenLogprob, ...] = ()
        if want_logprobs and event.logprobs:
            assert self._engine is not None
            text_of = self._engine.token_text
            tops = event.top_logprobs or tuple(() for _ in event.token_ids)
            logprobs = tuple(
                TokenLogprob(token=text_of(tid), logprob=lp, token_bytes=tuple(text_of(tid).encode()),
                             top=tuple((text_of(alt), alt_lp) for alt, alt_lp in top))
                for tid, lp, top in zip(event.token_ids, event.logprobs, tops, strict=False)
            )
        finish = event.finish_reason if event.finish_reason in ("stop", "length") else (
            "stop" if event.finish_reason is not None else None)
        return Delta(text=event.text, finish_reason=finish, prompt_tokens=event.prompt_tokens,
                     completion_tokens=event.completion_tokens, logprobs=logprobs)

    # --- metrics --------------------------------------------------------------------------------------------

    def _on_step(self, step_tokens: int, n_seqs: int) -> None:
        # Runs on the decode thread after every step: two dict increments, nothing that could block.
        self._batch_size_steps[n_seqs] = self._batch_size_steps.get(n_seqs, 0) + 1
        self._step_tokens_steps[step_tokens] = self._step_tokens_steps.get(step_tokens, 0) + 1

    def stats(self) -> BackendStats:
        engine = self._engine
        if engine is None:
            return BackendStats()
        s = engine.stats()
        return BackendStats(
            running=s.running,
            waiting=s.waiting,
            kv_used_cells=s.kv_used_cells,
            kv_total_cells=s.kv_total_cells,
            preemptions_total=s.preemptions_total,
            steps_total=s.steps_total,
            batch_size_steps=dict(self._batch_size_steps),
            step_tokens_steps=dict(self._step_tokens_steps),
            sampled_in_graph_total=s.sampled_in_graph_total,
            step_seconds=s.step_seconds,
            prefix_reused_tokens_total=s.prefix_reused_tokens_total,
        )
