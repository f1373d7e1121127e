"""The continuous-batching engine's front: the public face of server/engine.

    engine = Engine(EngineConfig(model_path=..., n_ctx=1024, n_parallel=8))  # 1024 tokens per sequence
    engine.start()                      # starts the core, which loads the model (start(wait=False): later)
    async for event in engine.generate("Hello", SamplingParams(max_tokens=32)):
        ...                             # StreamEvent deltas; the last one has finish_reason
    engine.stop()

The front tokenizes (with its own copy of the model's vocabulary, no weights), hands token ids to the engine
core (core.py, in a process of its own unless EngineConfig.core says thread), and turns the token ids that
come back into text deltas with stop strings (output.py). It reads the core on the event loop that uses it;
should the core die, the requests in flight end with an EngineError and a new core is started.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import threading
from collections.abc import AsyncIterator, Callable, Mapping
from collections.abc import Sequence as Seq
from typing import Any

from server.engine.chat_template import ChatTemplate, ChatTemplateError
from server.engine.config import EngineConfig
from server.engine.core_link import CoreLink, StepObserver
from server.engine.embedder import Embeddings
from server.engine.errors import (
    EmptyPromptError,
    EngineError,
    EngineNotReadyError,
    EngineStoppedError,
    InvalidTokenError,
    ModelLoadError,
    PromptTooLongError,
    SpeculationUnavailableError,
)
from server.engine.output import FrontRequest
from server.engine.protocol import (
    AbortRequests,
    AddRequest,
    EmbedRequest,
    EmbedResult,
)
from server.engine.sampling import check_grammar
from server.engine.stats import EngineStats
from server.engine.types import Placement, SamplingParams, StreamEvent
from server.engine.vocab import Vocabulary

__all__ = ["EmptyPromptError", "Engine", "EngineConfig", "EngineNotReadyError", "EngineStats",
           "PromptTooLongError"]

log = logging.getLogger(__name__)


class Engine:
    """One model behind one engine core with `n_parallel` sequence slots.

    `on_step(tokens_in_step, n_seqs)` is called on the front's event loop for every step the core ran
    (keep it quick); it can also be set later as the `on_step` attribute.
    """

    def __init__(self, config: EngineConfig, on_step: StepObserver | None = None) -> None:
        self.config = config
        # Called (on the event loop) when a dead core is not started again: the server cannot serve any more.
        self.on_give_up: Callable[[str], None] | None = None
        self.load_error: BaseException | None = None
        self._vocab: Vocabulary | None = None
        self._template: ChatTemplate | None = None
        self._link = CoreLink(config, self._give_up)
        self._link.on_step = on_step
        self._ids = itertools.count(1)
        self._done_loading = threading.Event()
        self._started = False

    @property
    def on_step(self) -> StepObserver | None:
        return self._link.on_step

    @on_step.setter
    def on_step(self, observer: StepObserver | None) -> None:
        self._link.on_step = observer

    @property
    def front_seconds(self) -> dict[str, float]:
        """The front's share of the steps: reading the core's messages, turning its tokens into text."""
        return self._link.front_seconds

    def attach(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Read the core on `loop` (default: the running one) from now on, so its death is seen while idle."""
        self._link.attach(loop)

    # --- lifecycle ------------------------------------------------------------------------------------------

    def start(self, wait: bool = True) -> None:
        """Read the vocabulary and start the core; with `wait`, block until the model is loaded (or raise
        ModelLoadError); without, load in the background (`wait_ready`, `load_error`)."""
        if self._started:
            raise RuntimeError("the engine was already started")
        self._started = True
        if wait:
            self._load()
            if self.load_error is not None:
                raise self.load_error
        else:
            threading.Thread(target=self._load, name="edgeserve-engine-load", daemon=True).start()

    def _load(self) -> None:
        try:
            self._vocab = Vocabulary.load(self.config.model_file(), self.config.verbose)
            self._template = self._load_template(self._vocab)
            self._link.start()
        except BaseException as exc:
            self.load_error = exc if isinstance(exc, ModelLoadError) else ModelLoadError(str(exc))
            log.error("model load failed: %s", exc)
        finally:
            self._done_loading.set()

    def _give_up(self, error: ModelLoadError) -> None:
        self.load_error = error
        log.error("%s", error)
        if self.on_give_up is not None:
            self.on_give_up(str(error))

    @staticmethod
    def _load_template(vocab: Vocabulary) -> ChatTemplate:
        bos, eos = vocab.token_text(vocab.bos), vocab.token_text(vocab.eos)
        try:
            return ChatTemplate(vocab.chat_template(), bos_token=bos, eos_token=eos)
        except ChatTemplateError as exc:
            log.warning("%s; using ChatML instead", exc)
            return ChatTemplate(None, bos_token=bos, eos_token=eos)

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Block until loading is over; True when the model is ready."""
        self._done_loading.wait(timeout)
        return self._link.ready.is_set()

    def stop(self) -> None:
        """Stop the core (requests in flight end with EngineStoppedError) and free everything."""
        if not self._started or self._link.stopping:
            return
        self._done_loading.wait()
        self._link.stop(EngineStoppedError("the engine was stopped"))
        if self._vocab is not None:
            self._vocab.free()
            self._vocab = None

    # --- model facts ----------------------------------------------------------------------------------------

    @property
    def is_ready(self) -> bool:
        return self._link.is_alive()

    @property
    def placement(self) -> Placement | None:
        """Where the core runs the model (None until loaded)."""
        info = self._link.info
        return info.placement if info is not None else None

    @property
    def core_pid(self) -> int | None:
        """The engine core's process id (None in thread mode or before it started)."""
        client = self._link.client
        return client.pid if client is not None else None

    @property
    def model_name(self) -> str:
        return self.config.model_file().stem

    @property
    def n_slots(self) -> int:
        info = self._link.info
        return info.n_slots if info is not None else self.config.n_parallel

    @property
    def n_ctx(self) -> int:
        """Tokens (prompt + generated) a single sequence may use."""
        info = self._link.info
        return info.n_ctx if info is not None else self.config.n_ctx

    def _vocabulary(self) -> Vocabulary:
        if self._vocab is None or not self._done_loading.is_set() or self.load_error is not None:
            if self.load_error is not None:
                raise EngineNotReadyError(f"the model failed to load: {self.load_error}")
            if not self._started:
                raise EngineNotReadyError("the engine is not running")
            if not self._done_loading.is_set():
                raise EngineNotReadyError("the model is still loading")
            raise EngineNotReadyError("the engine has stopped")
        return self._vocab

    @property
    def vocabulary(self) -> Vocabulary:
        """The front's copy of the model's vocabulary (token pieces, end-of-generation tokens, ...)."""
        return self._vocabulary()

    @property
    def n_vocab(self) -> int:
        return self._vocabulary().n_vocab

    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        return self._vocabulary().tokenize(text, add_special=add_special)

    def detokenize(self, ids: Seq[int]) -> str:
        return self._vocabulary().detokenize(list(ids))

    def token_text(self, token_id: int) -> str:
        """The text one generated token contributes (for logprobs), invalid UTF-8 replaced."""
        return self._vocabulary().piece(token_id).decode("utf-8", errors="replace")

    @property
    def chat_template(self) -> ChatTemplate:
        self._vocabulary()
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

    async def embed(self, inputs: Seq[str | Seq[int]]) -> Embeddings:
        """Pooled, L2-normalised embeddings of texts (tokenized with BOS as the model wants) or token ids,
        computed by the core on a context of its own (never in the way of a step)."""
        vocab = self._vocabulary()
        if not self.can_embed:
            raise EngineNotReadyError("embeddings are off: pooling is none")
        tokens = [vocab.tokenize(x) if isinstance(x, str) else [int(t) for t in x] for x in inputs]
        for t in tokens:
            if not t:
                raise EmptyPromptError()
            if len(t) > self.n_ctx:
                raise PromptTooLongError(len(t), 0, self.n_ctx)
            if any(x < 0 or x >= vocab.n_vocab for x in t):
                raise InvalidTokenError("input", vocab.n_vocab)
        self._require_core()
        link = self._link
        link.attach()
        req_id = next(self._ids)
        future: asyncio.Future[EmbedResult] = asyncio.get_running_loop().create_future()
        link.embeds[req_id] = future
        link.send(EmbedRequest(req_id, tuple(tuple(t) for t in tokens)))
        try:
            result = await future
        finally:
            link.embeds.pop(req_id, None)
        if result.error is not None:
            raise EngineError(result.error)
        return Embeddings(result.vectors, result.prompt_tokens)

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
        return self._run(tokens, list(params), shared=True)

    def _check(self, prompt: str | Seq[int], params: Seq[SamplingParams]) -> list[int]:
        vocab = self._vocabulary()
        self._require_core()
        tokens = vocab.tokenize(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        if not tokens:
            raise EmptyPromptError()
        limit = self.n_ctx
        longest = max(p.max_tokens for p in params)
        if len(tokens) + longest > limit:
            raise PromptTooLongError(len(tokens), longest, limit)
        if any(t < 0 or t >= vocab.n_vocab for t in tokens):
            raise InvalidTokenError("prompt", vocab.n_vocab)
        for p in params:
            if any(t < 0 or t >= vocab.n_vocab for t, _ in p.logit_bias):
                raise InvalidTokenError("logit_bias", vocab.n_vocab)
        if not self.config.speculates and any(p.speculative for p in params):
            raise SpeculationUnavailableError()
        for grammar in {p.grammar for p in params if p.grammar is not None}:
            # Parsed here: a bad grammar is the caller's error, not the core's.
            check_grammar(vocab.vocab, grammar)
        return tokens

    def _require_core(self) -> None:
        if not self.is_ready:
            if self.load_error is not None:
                raise EngineNotReadyError(f"the model failed to load: {self.load_error}")
            if self._started and not self._link.stopping and self._done_loading.is_set():
                raise EngineNotReadyError("the engine core is being started again")
            self._vocabulary()
            raise EngineNotReadyError("the engine is not running")

    async def _stream(self, tokens: list[int], params: SamplingParams) -> AsyncIterator[StreamEvent]:
        async for _, event in self._run(tokens, [params], shared=False):
            yield event

    async def _run(self, tokens: list[int], params: list[SamplingParams],
                   shared: bool) -> AsyncIterator[tuple[int, StreamEvent]]:
        self._require_core()
        link = self._link
        link.attach()
        vocab = self._vocabulary()
        req_id = next(self._ids)
        req = FrontRequest(req_id, len(tokens), params, vocab.piece, is_shared=shared)
        link.requests[req_id] = req
        try:
            link.send(AddRequest(req_id, tuple(tokens), tuple(params)))
            open_choices = len(params)
            while open_choices:
                item = await req.queue.get()
                choice, event = item if shared else (0, item)
                if isinstance(event, BaseException):
                    raise event
                yield choice, event
                if event.finish_reason is not None:
                    open_choices -= 1
        finally:
            link.requests.pop(req_id, None)
            if not req.is_finished:
                link.send_abort(AbortRequests(req_id))

    # --- observability --------------------------------------------------------------------------------------

    def stats(self) -> EngineStats:
        """The core's latest snapshot (sent with its steps, at most a quarter second old while it works, and
        once more when it goes idle)."""
        self._link.poll()  # where no event loop reads the core now, take in what it sent
        stats = self._link.stats
        if stats is None:
            return EngineStats(
                is_ready=False, n_slots=self.n_slots, running=0, waiting=0, kv_used_cells=0,
                kv_cached_cells=0,
                kv_total_cells=self._link.info.kv_cells if self._link.info else self.config.n_ctx_total,
                preemptions_total=0, steps_total=0, step_tokens_total=0, last_step_tokens=0, last_step_seqs=0,
                max_step_tokens=0, max_step_seqs=0, prompt_tokens_total=0, generated_tokens_total=0,
                prefix_reused_tokens_total=0, requests_finished_total=0, requests_cancelled_total=0,
            )
        if stats.is_ready != self.is_ready:
            stats = dataclasses.replace(stats, is_ready=self.is_ready)
        return stats

