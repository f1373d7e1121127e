"""The embedded backend: edgeserve's continuous-batching engine over llama.cpp, in this process."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator, Callable

from server.engine.config import EngineConfig
from server.engine.engine import Engine
from server.engine.errors import (
    EmptyPromptError,
    EngineError,
    EngineNotReadyError,
    EngineStoppedError,
    InvalidGrammarError,
    InvalidTokenError,
    PromptTooLongError,
    SpeculationUnavailableError,
)
from server.engine.types import SamplingParams, StreamEvent
from server.gateway.backends.base import (
    BackendError,
    BackendStats,
    BackendUnavailableError,
    ContextLengthExceededError,
    Delta,
    EmbeddingInput,
    EmbeddingResult,
    GenerationJob,
    TokenLogprob,
)
from server.gateway.backends.features import ALL_FEATURES, EMBEDDINGS
from server.gateway.settings import GatewaySettings
from server.gateway.tool_parser import route, with_tool_calls
from server.gateway.tool_prompt import call_grammar, render_chat

log = logging.getLogger(__name__)


class EmbeddedBackend:
    """Runs jobs on an in-process Engine. `start()` loads the model off the event loop."""

    name = "embedded"

    def __init__(self, config: EngineConfig, model_id: str | None = None, *,
                 generic_tool_prompt: bool = False) -> None:
        self.config = config
        self.model_id = model_id or config.model_file().stem
        # tool_choice auto on a model whose template cannot render tools: edgeserve's prompt, or a 400.
        self.generic_tool_prompt = generic_tool_prompt
        self.features = ALL_FEATURES if config.pooling != "none" else ALL_FEATURES - {EMBEDDINGS}
        self._engine: Engine | None = None
        # Called when the engine core died for good (it is not started again): the gateway should exit.
        self.on_fatal: Callable[[str], None] | None = None
        self._batch_size_steps: dict[int, int] = {}
        self._step_tokens_steps: dict[int, int] = {}

    @classmethod
    def from_settings(cls, settings: GatewaySettings) -> EmbeddedBackend:
        """The engine exactly as the settings describe it: its config is taken whole, not rebuilt."""
        return cls(settings.engine, model_id=settings.model_name,
                   generic_tool_prompt=settings.tool_prompt == "generic")

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
        # From now on this loop reads the core, so a core that dies while idle is seen and started again.
        engine.attach()
        engine.on_give_up = self._gave_up
        self._engine = engine

    def _gave_up(self, reason: str) -> None:
        if self.on_fatal is not None:
            self.on_fatal(reason)

    async def stop(self) -> None:
        if self._engine is not None:
            engine, self._engine = self._engine, None
            await asyncio.to_thread(engine.stop)

    def _render(self, job: GenerationJob) -> str:
        assert self._engine is not None
        if job.kind == "chat":
            prompt = render_chat(self._engine.chat_template, job.messages, job.tools,
                                 generic_for_auto=self.generic_tool_prompt)
            return prompt + job.continuation
        return job.prompt + job.continuation

    def _tokens(self, job: GenerationJob) -> list[int]:
        assert self._engine is not None
        if job.prompt_tokens is not None:
            return list(job.prompt_tokens)
        return self._engine.tokenize(self._render(job))

    def count_prompt_tokens(self, job: GenerationJob) -> int | None:
        if self._engine is None:
            return None
        return len(self._tokens(job))

    @staticmethod
    def _choice_params(job: GenerationJob) -> list[SamplingParams]:
        """One SamplingParams per choice: the grammar of the constraint or of a forced tool call, and seeds
        seed, seed + 1, ... so that the choices differ yet repeat."""
        params = job.params
        grammar = job.constraint.grammar if job.constraint is not None else None
        if grammar is None and job.tools is not None:
            grammar = call_grammar(job.tools)
        if grammar is not None:
            params = dataclasses.replace(params, grammar=grammar)
        if job.n == 1 or params.seed is None:
            return [params] * job.n
        return [dataclasses.replace(params, seed=params.seed + i) for i in range(job.n)]

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
        stream: AsyncIterator[tuple[int, StreamEvent]] | None = None
        tool_streams = with_tool_calls(job.tools)
        try:
            tokens = self._tokens(job) if job.prompt_tokens is not None else engine.tokenize(prompt)
            choices = self._choice_params(job)
            if job.extra.get("max_tokens_explicit") is False:
                # No limit was asked for: generate up to the end of this engine's context window.
                room = engine.n_ctx - len(tokens)
                if room >= 1 and choices[0].max_tokens > room:
                    choices = [dataclasses.replace(p, max_tokens=room) for p in choices]
            # The engine checks the prompt length when the stream is created, before anything is queued.
            stream = engine.generate_choices(tokens, choices)
            async for index, event in stream:
                yield route(tool_streams, job.tools, self._delta(event, want_logprobs, index))
        except PromptTooLongError as exc:
            raise ContextLengthExceededError(str(exc), param=param) from exc
        except InvalidTokenError as exc:
            raise BackendError(str(exc), status_code=400, code="invalid_request_error", retryable=False,
                               param=exc.where if exc.where == "logit_bias" else param) from exc
        except InvalidGrammarError as exc:
            raise BackendError(str(exc), status_code=400, code="invalid_request_error", retryable=False,
                               param="grammar") from exc
        except SpeculationUnavailableError as exc:
            raise BackendError(str(exc), status_code=400, code="invalid_request_error", retryable=False,
                               param="speculative") from exc
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
            # Closing the engine's stream cancels the sequences and frees their KV within one step.
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()

    def _delta(self, event: StreamEvent, want_logprobs: bool, index: int = 0) -> Delta:
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
                     completion_tokens=event.completion_tokens, logprobs=logprobs, index=index)

    # --- embeddings -----------------------------------------------------------------------------------------

    async def embed(self, inputs: list[EmbeddingInput]) -> EmbeddingResult:
        engine = self._engine
        if engine is None or not engine.is_ready:
            raise BackendUnavailableError("the embedded engine is not loaded")
        if not engine.can_embed:
            raise BackendError("embeddings are off on this server (pooling none)", status_code=400,
                               code="unsupported_feature", retryable=False, param="model")
        try:
            # The core embeds on a context and a thread of its own: a step never waits for it.
            result = await engine.embed(inputs)
        except PromptTooLongError as exc:
            raise ContextLengthExceededError(f"an input is too long: {exc}", param="input") from exc
        except (InvalidTokenError, EmptyPromptError) as exc:
            raise BackendError(str(exc), status_code=400, code="invalid_request_error", retryable=False,
                               param="input") from exc
        except EngineNotReadyError as exc:
            raise BackendUnavailableError(str(exc)) from exc
        except EngineError as exc:
            raise BackendError(str(exc), status_code=500, code="engine_error") from exc
        vectors = tuple(tuple(float(x) for x in v) for v in result.vectors)
        return EmbeddingResult(vectors, result.prompt_tokens)

    def placement(self) -> dict[str, object] | None:
        """Where the engine runs: devices, layers offloaded, this llama.cpp build's GPU support."""
        placement = self._engine.placement if self._engine is not None else None
        if placement is None:
            return None
        return {**dataclasses.asdict(placement), "summary": placement.describe()}

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
            step_seconds={**s.step_seconds, **engine.front_seconds},
            prefix_reused_tokens_total=s.prefix_reused_tokens_total,
            spec_drafted_total=s.spec_drafted_total,
            spec_accepted_total=s.spec_accepted_total,
            seq_steps_total=s.seq_steps_total,
            generated_tokens_total=s.generated_tokens_total,
        )
