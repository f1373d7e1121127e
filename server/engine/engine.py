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
import contextlib
import dataclasses
import itertools
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from collections.abc import Sequence as Seq
from typing import Any

from server.engine.chat_template import ChatTemplate, ChatTemplateError
from server.engine.config import EngineConfig
from server.engine.core_client import CoreClient, CoreGoneError
from server.engine.embedder import Embeddings
from server.engine.errors import (
    EmptyPromptError,
    EngineError,
    EngineNotReadyError,
    EngineStoppedError,
    InvalidTokenError,
    ModelLoadError,
    PromptTooLongError,
)
from server.engine.output import FrontRequest
from server.engine.protocol import (
    AbortRequests,
    AddRequest,
    ChoiceFailed,
    CoreFailed,
    CoreInfo,
    EmbedRequest,
    EmbedResult,
    StatsUpdate,
    StepOutputs,
    ToFront,
)
from server.engine.sampling import check_grammar
from server.engine.stats import EngineStats
from server.engine.types import Placement, SamplingParams, StreamEvent
from server.engine.vocab import Vocabulary

__all__ = ["EmptyPromptError", "Engine", "EngineConfig", "EngineNotReadyError", "EngineStats",
           "PromptTooLongError"]

log = logging.getLogger(__name__)

StepObserver = Any  # Callable[[int, int], None]: (tokens in the step, sequences in it)

# A core that dies this many times within RESTART_WINDOW_S is not started again.
MAX_RESTARTS = 5
RESTART_WINDOW_S = 60.0


class Engine:
    """One model behind one engine core with `n_parallel` sequence slots.

    `on_step(tokens_in_step, n_seqs)` is called on the front's event loop for every step the core ran
    (keep it quick); it can also be set later as the `on_step` attribute.
    """

    def __init__(self, config: EngineConfig, on_step: StepObserver | None = None) -> None:
        self.config = config
        self.on_step = on_step
        # Called (on the event loop) when a dead core is not started again: the server cannot serve any more.
        self.on_give_up: Callable[[str], None] | None = None
        self.load_error: BaseException | None = None
        self._vocab: Vocabulary | None = None
        self._template: ChatTemplate | None = None
        self._client: CoreClient | None = None
        self._info: CoreInfo | None = None
        self._stats: EngineStats | None = None
        self._requests: dict[int, FrontRequest] = {}
        self._embeds: dict[int, asyncio.Future[EmbedResult]] = {}
        self._outbox: list[AddRequest | AbortRequests | EmbedRequest] = []
        self._ids = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._done_loading = threading.Event()
        self._started = False
        self._stopping = False
        self._deaths: list[float] = []
        self.front_seconds = {"front_read": 0.0, "front_text": 0.0}

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
            self._info = self._start_core()
        except BaseException as exc:
            self.load_error = exc if isinstance(exc, ModelLoadError) else ModelLoadError(str(exc))
            log.error("model load failed: %s", exc)
        else:
            self._ready.set()
        finally:
            self._done_loading.set()

    def _start_core(self) -> CoreInfo:
        client = CoreClient(self.config, self.config.core)
        client.start()
        try:
            ready = client.wait_ready()
        except BaseException:
            client.stop()
            raise
        self._client = client
        self._stats = ready.stats
        return ready.info

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
        return self._ready.is_set()

    def stop(self) -> None:
        """Stop the core (requests in flight end with EngineStoppedError) and free everything."""
        if not self._started or self._stopping:
            return
        self._stopping = True
        self._done_loading.wait()
        self._ready.clear()
        self._fail_open(EngineStoppedError("the engine was stopped"))
        self._detach()
        if self._client is not None:
            self._client.stop()
            self._client = None
        if self._vocab is not None:
            self._vocab.free()
            self._vocab = None

    def _fail_open(self, error: EngineError) -> None:
        requests, self._requests = self._requests, {}
        embeds, self._embeds = self._embeds, {}
        loop = self._loop

        def fail() -> None:
            for req in requests.values():
                req.fail(None, error)
            for future in embeds.values():
                if not future.done():
                    future.set_exception(error)

        if loop is None or loop.is_closed():
            return
        if _on_loop(loop):
            fail()
        else:
            loop.call_soon_threadsafe(fail)

    # --- the event loop that reads the core -----------------------------------------------------------------

    def attach(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Read the core on `loop` (default: the running one) from now on, so its death is seen while idle.
        Requests attach their loop themselves; one loop at a time."""
        loop = loop or asyncio.get_running_loop()
        if loop is self._loop or self._client is None:
            return
        old = self._loop
        if old is not None and not old.is_closed():
            if old.is_running() and not _on_loop(old):
                raise RuntimeError("the engine is in use by another event loop")
            old.remove_reader(self._client.fileno())
        self._loop = loop
        loop.add_reader(self._client.fileno(), self._on_readable)

    def _detach(self) -> None:
        loop, self._loop = self._loop, None
        if loop is None or loop.is_closed() or self._client is None:
            return
        fd = self._client.fileno()
        if _on_loop(loop):
            loop.remove_reader(fd)
        else:
            done = threading.Event()

            def remove() -> None:
                loop.remove_reader(fd)
                done.set()

            loop.call_soon_threadsafe(remove)
            done.wait(5.0)

    def _on_readable(self) -> None:
        client = self._client
        if client is None:
            return
        started = time.perf_counter()
        try:
            messages = client.read_ready()
        except EOFError:
            self._on_core_exit(client)
            return
        read = time.perf_counter()
        for msg in messages:
            self._on_message(msg)
        # The front's share of a step: reading the core's messages, and turning its tokens into text.
        self.front_seconds["front_read"] += read - started
        self.front_seconds["front_text"] += time.perf_counter() - read

    def _on_message(self, msg: ToFront) -> None:
        if isinstance(msg, StepOutputs):
            if msg.stats is not None:
                self._stats = msg.stats
            if self.on_step is not None and msg.n_tokens:
                try:
                    self.on_step(msg.n_tokens, msg.n_seqs)
                except Exception:
                    log.exception("on_step observer failed")
            requests = self._requests
            for out in msg.outputs:
                req = requests.get(out.req_id)
                if req is not None and req.on_token(out):
                    self._send_abort(AbortRequests(out.req_id, (out.choice,), finished=True))
        elif isinstance(msg, StatsUpdate):
            self._stats = msg.stats
        elif isinstance(msg, EmbedResult):
            future = self._embeds.pop(msg.req_id, None)
            if future is not None and not future.done():
                future.set_result(msg)
        elif isinstance(msg, ChoiceFailed):
            req = self._requests.get(msg.req_id)
            if req is not None:
                req.fail(msg.choice, EngineError(msg.message))
        elif isinstance(msg, CoreFailed):
            log.error("the engine core failed: %s", msg.message)

    def _on_core_exit(self, client: CoreClient) -> None:
        """The core's pipe closed: fail what was in flight and (unless stopping) start a new core."""
        loop = self._loop
        self._ready.clear()
        if self._stopping:
            self._detach()
            return
        why = client.exit_description()
        log.error("the engine core died (%s): failing %d requests in flight and starting it again", why,
                  len(self._requests))
        self._fail_open(EngineError(f"the engine core died ({why}); it is being started again"))
        self._detach()
        client.stop(timeout_s=1.0)
        now = time.monotonic()
        self._deaths = [t for t in self._deaths if now - t < RESTART_WINDOW_S] + [now]
        if len(self._deaths) > MAX_RESTARTS:
            self._give_up(ModelLoadError(f"the engine core died {len(self._deaths)} times within "
                                         f"{RESTART_WINDOW_S:.0f} s; not starting it again"))
            return
        if loop is not None:
            loop.run_in_executor(None, self._restart, loop)

    def _give_up(self, error: ModelLoadError) -> None:
        self.load_error = error
        log.error("%s", error)
        if self.on_give_up is not None:
            self.on_give_up(str(error))

    def _restart(self, loop: asyncio.AbstractEventLoop) -> None:
        delay = 0.25 * 2 ** (len(self._deaths) - 1)
        time.sleep(min(delay, 4.0))
        try:
            info = self._start_core()
        except BaseException as exc:
            error = exc if isinstance(exc, ModelLoadError) else ModelLoadError(str(exc))
            log.error("the engine core could not be started again: %s", exc)
            if not loop.is_closed():
                loop.call_soon_threadsafe(self._give_up, error)
            return
        self._info = info
        log.info("the engine core is back (pid %s)", self._client.pid if self._client else None)
        self._ready.set()
        if not loop.is_closed():
            loop.call_soon_threadsafe(self.attach, loop)

    # --- model facts ----------------------------------------------------------------------------------------

    @property
    def is_ready(self) -> bool:
        client = self._client
        return self._ready.is_set() and client is not None and client.is_alive()

    @property
    def placement(self) -> Placement | None:
        """Where the core runs the model (None until loaded)."""
        return self._info.placement if self._info is not None else None

    @property
    def core_pid(self) -> int | None:
        """The engine core's process id (None in thread mode or before it started)."""
        return self._client.pid if self._client is not None else None

    @property
    def model_name(self) -> str:
        return self.config.model_file().stem

    @property
    def n_slots(self) -> int:
        return self._info.n_slots if self._info is not None else self.config.n_parallel

    @property
    def n_ctx(self) -> int:
        """Tokens (prompt + generated) a single sequence may use."""
        return self._info.n_ctx if self._info is not None else self.config.n_ctx

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
        self.attach()
        req_id = next(self._ids)
        future: asyncio.Future[EmbedResult] = asyncio.get_running_loop().create_future()
        self._embeds[req_id] = future
        self._send(EmbedRequest(req_id, tuple(tuple(t) for t in tokens)))
        try:
            result = await future
        finally:
            self._embeds.pop(req_id, None)
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
        for grammar in {p.grammar for p in params if p.grammar is not None}:
            # Parsed here: a bad grammar is the caller's error, not the core's.
            check_grammar(vocab.vocab, grammar)
        return tokens

    def _require_core(self) -> None:
        if not self.is_ready:
            if self.load_error is not None:
                raise EngineNotReadyError(f"the model failed to load: {self.load_error}")
            if self._started and not self._stopping and self._done_loading.is_set():
                raise EngineNotReadyError("the engine core is being started again")
            self._vocabulary()
            raise EngineNotReadyError("the engine is not running")

    def _send(self, msg: AddRequest | AbortRequests | EmbedRequest) -> None:
        """To the core. On the loop that reads the core, messages of one loop iteration go out together,
        so requests that arrive together are scheduled together (and one write carries them)."""
        client = self._client
        if client is None:
            raise EngineNotReadyError("the engine is not running")
        loop = self._loop
        if loop is not None and _on_loop(loop):
            self._outbox.append(msg)
            if len(self._outbox) == 1:
                loop.call_soon(self._flush)
            return
        try:
            client.send(msg)
        except CoreGoneError as exc:
            raise EngineNotReadyError(str(exc)) from None

    def _flush(self) -> None:
        messages, self._outbox = self._outbox, []
        client = self._client
        if not messages or client is None:
            return
        try:
            client.send(tuple(messages))
        except CoreGoneError as exc:
            # The reader sees the end of the core's pipe too and fails every request in flight.
            log.warning("%s: %d messages not sent", exc, len(messages))

    def _send_abort(self, msg: AbortRequests) -> None:
        with contextlib.suppress(EngineNotReadyError):  # the core is gone: nothing runs there to abort
            self._send(msg)

    async def _stream(self, tokens: list[int], params: SamplingParams) -> AsyncIterator[StreamEvent]:
        async for _, event in self._run(tokens, [params], shared=False):
            yield event

    async def _run(self, tokens: list[int], params: list[SamplingParams],
                   shared: bool) -> AsyncIterator[tuple[int, StreamEvent]]:
        self._require_core()
        self.attach()
        vocab = self._vocabulary()
        req_id = next(self._ids)
        req = FrontRequest(req_id, len(tokens), params, vocab.piece, is_shared=shared)
        self._requests[req_id] = req
        try:
            self._send(AddRequest(req_id, tuple(tokens), tuple(params)))
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
            self._requests.pop(req_id, None)
            if not req.is_finished:
                self._send_abort(AbortRequests(req_id))

    # --- observability --------------------------------------------------------------------------------------

    def stats(self) -> EngineStats:
        """The core's latest snapshot (sent with its steps, at most a quarter second old while it works, and
        once more when it goes idle)."""
        loop = self._loop
        if loop is None or loop.is_closed() or not loop.is_running():
            self._on_readable()  # no event loop reads the core now: take in what it sent
        stats = self._stats
        if stats is None:
            return EngineStats(
                is_ready=False, n_slots=self.n_slots, running=0, waiting=0, kv_used_cells=0,
                kv_cached_cells=0,
                kv_total_cells=self._info.kv_cells if self._info else self.config.n_ctx_total,
                preemptions_total=0, steps_total=0, step_tokens_total=0, last_step_tokens=0, last_step_seqs=0,
                max_step_tokens=0, max_step_seqs=0, prompt_tokens_total=0, generated_tokens_total=0,
                prefix_reused_tokens_total=0, requests_finished_total=0, requests_cancelled_total=0,
            )
        if stats.is_ready != self.is_ready:
            stats = dataclasses.replace(stats, is_ready=self.is_ready)
        return stats


def _on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False
