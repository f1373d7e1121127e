"""The continuous-batching engine: the public face of server/engine.

    engine = Engine(EngineConfig(model_path=..., n_ctx=1024, n_parallel=8))  # 1024 tokens per sequence
    engine.start()                      # loads the model (start(wait=False) loads in the background)
    async for event in engine.generate("Hello", SamplingParams(max_tokens=32)):
        ...                             # StreamEvent deltas; the last one has finish_reason
    engine.stop()

Closing the iterator (or cancelling the task that iterates it) means the client went away: the sequence and
its KV are freed within one engine step.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
from collections.abc import AsyncIterator, Mapping
from collections.abc import Sequence as Seq
from typing import Any

from server.engine.chat_template import ChatTemplate, ChatTemplateError
from server.engine.config import EngineConfig, EngineStats
from server.engine.embedder import Embedder, Embeddings
from server.engine.errors import (
    EmptyPromptError,
    EngineNotReadyError,
    InvalidTokenError,
    ModelLoadError,
    PromptTooLongError,
)
from server.engine.llama_context import LlamaRuntime
from server.engine.preflight import check_memory, gpu_offload_wanted, warn_if_gpu_unused
from server.engine.sampling import check_grammar
from server.engine.sequence import EventSink, Sequence
from server.engine.types import Placement, SamplingParams, StreamEvent
from server.engine.worker import DecodeLoop, StepObserver

__all__ = [
    "EmptyPromptError",
    "Engine",
    "EngineConfig",
    "EngineNotReadyError",
    "EngineStats",
    "PromptTooLongError",
]

log = logging.getLogger(__name__)

GIL_SWITCH_INTERVAL_S = 0.001


class Engine:
    """One model, one llama.cpp context with `n_parallel` sequence slots, one decode thread.

    `on_step(tokens_in_step, n_seqs)` is called on the decode thread after every step (keep it quick: it
    delays the next step); it can also be set later as the `on_step` attribute.
    """

    def __init__(self, config: EngineConfig, on_step: StepObserver | None = None) -> None:
        self.config = config
        self._on_step = on_step
        self._runtime: LlamaRuntime | None = None
        self._loop: DecodeLoop | None = None
        self._template: ChatTemplate | None = None
        self._embedder: Embedder | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._done_loading = threading.Event()
        self.load_error: BaseException | None = None

    # --- lifecycle ------------------------------------------------------------------------------------------

    def start(self, wait: bool = True) -> None:
        """Load the model and start the decode thread; with `wait`, block until loaded (or ModelLoadError)."""
        if self._thread is not None:
            raise RuntimeError("the engine was already started")
        if sys.getswitchinterval() > GIL_SWITCH_INTERVAL_S:
            # The decode thread needs the GIL for a moment between two llama_decode calls; a busy event loop
            # would make it wait up to the interpreter's switch interval (5 ms by default) every step.
            sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
        self._thread = threading.Thread(target=self._main, name="edgeserve-engine", daemon=True)
        self._thread.start()
        if wait:
            self._done_loading.wait()
            if self.load_error is not None:
                raise self.load_error

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Block until loading is over; True when the model is ready."""
        self._done_loading.wait(timeout)
        return self._ready.is_set()

    def _main(self) -> None:
        runtime: LlamaRuntime | None = None
        try:
            if not self.config.force:
                check_memory(self.config, self.config.model_file(), on_gpu=gpu_offload_wanted(self.config))
            runtime = LlamaRuntime(self.config)
            self._template = self._load_template(runtime)
            self._loop = DecodeLoop(runtime, self.config, self._on_step)
            if self.config.pooling != "none":
                self._embedder = Embedder(runtime.model, self.config, runtime.n_vocab)
            self._runtime = runtime
        except BaseException as exc:
            self.load_error = exc if isinstance(exc, ModelLoadError) else ModelLoadError(str(exc))
            log.error("model load failed: %s", exc)
            if runtime is not None:
                runtime.close()
            self._done_loading.set()
            return
        self._ready.set()
        self._done_loading.set()
        log.info("engine ready: %s on %s, %d slots, %d KV cells, %d tokens per sequence",
                 self.config.model_file().name, runtime.placement.describe(), runtime.n_seq_max,
                 runtime.kv_cells, runtime.n_ctx)
        warn_if_gpu_unused(runtime.placement, self.config)
        try:
            self._loop.run()
        finally:
            self._ready.clear()

    @staticmethod
    def _load_template(runtime: LlamaRuntime) -> ChatTemplate:
        bos, eos = runtime.token_text(runtime.bos), runtime.token_text(runtime.eos)
        try:
            return ChatTemplate(runtime.chat_template(), bos_token=bos, eos_token=eos)
        except ChatTemplateError as exc:
            log.warning("%s; using ChatML instead", exc)
            return ChatTemplate(None, bos_token=bos, eos_token=eos)

    def stop(self) -> None:
        """Stop the decode thread (in-flight requests end with EngineStoppedError) and free llama.cpp."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._done_loading.wait()
        if self._loop is not None:
            self._loop.stop()
        thread.join()
        self._ready.clear()
        if self._embedder is not None:
            self._embedder.close()
            self._embedder = None
        if self._runtime is not None:
            self._runtime.close()
            self._runtime = None

    @property
    def on_step(self) -> StepObserver | None:
        return self._on_step

    @on_step.setter
    def on_step(self, observer: StepObserver | None) -> None:
        self._on_step = observer
        if self._loop is not None:
            self._loop.on_step = observer

    @property
    def is_ready(self) -> bool:
        return self._ready.is_set()

    def _rt(self) -> LlamaRuntime:
        if self._runtime is None or not self._ready.is_set():
            if self.load_error is not None:
                raise EngineNotReadyError(f"the model failed to load: {self.load_error}")
            if self._thread is None:
                raise EngineNotReadyError("the engine is not running")
            if not self._done_loading.is_set():
                raise EngineNotReadyError("the model is still loading")
            raise EngineNotReadyError("the engine has stopped")
        return self._runtime

    @property
    def placement(self) -> Placement | None:
        """Where the engine runs (None until loaded)."""
        return self._runtime.placement if self._runtime is not None else None

    # --- model facts ----------------------------------------------------------------------------------------

    @property
    def model_name(self) -> str:
        return self.config.model_file().stem

    @property
    def n_slots(self) -> int:
        return self._runtime.n_seq_max if self._runtime is not None else self.config.n_parallel

    @property
    def n_ctx(self) -> int:
        """Tokens (prompt + generated) a single sequence may use."""
        if self._runtime is not None:
            return self._runtime.n_ctx
        return self.config.n_ctx

    @property
    def n_vocab(self) -> int:
        return self._rt().n_vocab

    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        return self._rt().tokenize(text, add_special=add_special)

    def detokenize(self, ids: Seq[int]) -> str:
        return self._rt().detokenize(list(ids))

    def token_text(self, token_id: int) -> str:
        """The text one generated token contributes (for logprobs), invalid UTF-8 replaced."""
        return self._rt().piece(token_id).decode("utf-8", errors="replace")

    @property
    def chat_template(self) -> ChatTemplate:
        self._rt()
        assert self._template is not None
        return self._template

    def apply_chat_template(self, messages: Seq[Mapping[str, Any]],
                            add_generation_prompt: bool = True) -> str:
        """Render OpenAI-style messages with the model's template (ChatML when it has none)."""
        return self.chat_template.render(messages, add_generation_prompt=add_generation_prompt)

    # --- embeddings -----------------------------------------------------------------------------------------

    @property
    def can_embed(self) -> bool:
        return self.config.pooling != "none"

    def embed(self, inputs: Seq[str | Seq[int]]) -> Embeddings:
        """Pooled, L2-normalised embeddings of texts (tokenized with BOS as the model wants) or token ids.
        Blocking, on the embedding context's own lock: run it off the event loop."""
        runtime = self._rt()
        if self._embedder is None:
            raise EngineNotReadyError("embeddings are off: pooling is none")
        tokens = [runtime.tokenize(x) if isinstance(x, str) else [int(t) for t in x] for x in inputs]
        return self._embedder.embed(tokens)

    # --- generation -----------------------------------------------------------------------------------------

    def generate(self, prompt: str | Seq[int], params: SamplingParams) -> AsyncIterator[StreamEvent]:
        """Stream a completion of `prompt` (text, tokenized with BOS as the model wants, or token ids).

        Checks run now, before anything is queued: EngineNotReadyError, EmptyPromptError,
        PromptTooLongError (prompt tokens + max_tokens over n_ctx), InvalidTokenError and
        InvalidGrammarError raise from this call. The request is queued when iteration starts.
        """
        tokens = self._check(prompt, [params])
        return self._stream(tokens, params)

    def generate_choices(self, prompt: str | Seq[int],
                         params: Seq[SamplingParams]) -> AsyncIterator[tuple[int, StreamEvent]]:
        """Several completions of one prompt, one per SamplingParams, as (choice index, event) pairs in the
        order they come. The prompt is computed once: the other choices copy its KV from the first."""
        tokens = self._check(prompt, params)
        return self._stream_choices(tokens, list(params))

    def _check(self, prompt: str | Seq[int], params: Seq[SamplingParams]) -> list[int]:
        runtime = self._rt()
        tokens = runtime.tokenize(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        if not tokens:
            raise EmptyPromptError()
        limit = runtime.n_ctx
        longest = max(p.max_tokens for p in params)
        if len(tokens) + longest > limit:
            raise PromptTooLongError(len(tokens), longest, limit)
        if any(t < 0 or t >= runtime.n_vocab for t in tokens):
            raise InvalidTokenError("prompt", runtime.n_vocab)
        for p in params:
            if any(t < 0 or t >= runtime.n_vocab for t, _ in p.logit_bias):
                raise InvalidTokenError("logit_bias", runtime.n_vocab)
        for grammar in {p.grammar for p in params if p.grammar is not None}:
            # Parsed here, on the caller's thread: a bad grammar is the caller's error, not the decode loop's.
            check_grammar(runtime.vocab, grammar)
        return tokens

    async def _stream(self, tokens: list[int], params: SamplingParams) -> AsyncIterator[StreamEvent]:
        async for _, event in self._run([tokens], [params], shared=False):
            yield event

    async def _stream_choices(self, tokens: list[int],
                              params: list[SamplingParams]) -> AsyncIterator[tuple[int, StreamEvent]]:
        async for item in self._run([tokens] * len(params), params, shared=True):
            yield item

    async def _run(self, prompts: list[list[int]], params: list[SamplingParams],
                   shared: bool) -> AsyncIterator[tuple[int, StreamEvent]]:
        loop = self._loop
        runtime = self._runtime
        if loop is None or runtime is None or not self._ready.is_set():
            raise EngineNotReadyError("the engine is not running")
        sink = EventSink(asyncio.get_running_loop(), is_shared=shared)
        seqs: list[Sequence] = []
        for i, (tokens, p) in enumerate(zip(prompts, params, strict=True)):
            leader = seqs[0] if seqs else None
            seqs.append(Sequence(list(tokens), p, sink, runtime.piece, choice=i, leader=leader))
        for seq in seqs:
            loop.submit(seq)
        open_choices = len(seqs)
        try:
            while open_choices:
                item = await sink.queue.get()
                choice, event = item if shared else (0, item)
                if isinstance(event, BaseException):
                    raise event
                yield choice, event
                if event.finish_reason is not None:
                    open_choices -= 1
        finally:
            for seq in seqs:
                if not (seq.is_finished or seq.is_answered):
                    loop.cancel(seq)

    # --- observability --------------------------------------------------------------------------------------

    def stats(self) -> EngineStats:
        loop = self._loop
        if loop is None:
            return EngineStats(
                is_ready=False, n_slots=self.n_slots, running=0, waiting=0, kv_used_cells=0,
                kv_cached_cells=0, kv_total_cells=self.config.n_ctx_total, preemptions_total=0, steps_total=0,
                step_tokens_total=0,
                last_step_tokens=0, last_step_seqs=0, max_step_tokens=0, max_step_seqs=0,
                prompt_tokens_total=0, generated_tokens_total=0, prefix_reused_tokens_total=0,
                requests_finished_total=0, requests_cancelled_total=0,
            )
        sched = loop.sched
        return EngineStats(
            is_ready=self.is_ready,
            n_slots=len(sched.slots),
            running=len(sched.running),
            waiting=len(sched.waiting) + loop.n_inbox,
            kv_used_cells=sched.kv_used(),
            kv_cached_cells=sched.kv_cached(),
            kv_total_cells=sched.kv_cells,
            preemptions_total=sched.preemptions,
            steps_total=loop.steps,
            step_tokens_total=loop.step_tokens_total,
            last_step_tokens=loop.last_step_tokens,
            last_step_seqs=loop.last_step_seqs,
            max_step_tokens=loop.max_step_tokens,
            max_step_seqs=loop.max_step_seqs,
            prompt_tokens_total=loop.prompt_tokens_total,
            generated_tokens_total=loop.generated_tokens_total,
            prefix_reused_tokens_total=sched.reused_tokens,
            requests_finished_total=loop.finished_total,
            requests_cancelled_total=loop.cancelled_total,
            sampled_in_graph_total=loop.sampled_in_graph_total,
            step_seconds=loop.profile.snapshot(),
        )
