"""Locust users that load an OpenAI-compatible server (edgeserve, llama-server, SGLang) and time it.

    locust -f loadtest/locustfile.py --headless -u 8 -r 8 -t 60s --host http://127.0.0.1:8000 --csv out/run

Each user sends the request kinds of the workload's mix (streamed and non-streamed chat completions and
completions) one after another (closed loop: users = concurrency), or paced so that all users together offer
EDGESERVE_LOADTEST_RATE_RPS requests per second. Prompts come from the shipped set
(loadtest/data/prompts.jsonl), sampled as chat clients send them. Per request, rows in Locust's statistics
(CSV and web UI), named by kind:
  * "POST": response_time = end-to-end latency (ms), response_length = completion tokens from `usage`;
  * "TTFT" (streamed kinds): time to the first token (ms);
  * "ITL" (streamed kinds): the request's mean gap between tokens after the first (ms);
  * "TOKENS/S": that request's tokens per second after its first token (a rate in the milliseconds column).
The workload is read from EDGESERVE_LOADTEST_* variables (see loadtest/workload.py); with
EDGESERVE_LOADTEST_SHAPE=step, users grow by STEP_USERS every STEP_S seconds up to -u. With
EDGESERVE_LOADTEST_SUMMARY_PATH set, a JSON summary (TTFT and latency samples, aggregate tokens/s, errors) is
written there when the test stops. With --stop-timeout, requests running when the time is up finish and count
for latency and errors; throughput counts only tokens generated before the stop.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gevent
import requests
from locust import User, events
from locust.env import Environment
from locust.stats import CSV_STATS_INTERVAL_SEC
from locust.user.wait_time import constant_pacing

from loadtest import shapes
from loadtest.summary import Recorder
from loadtest.workload import CHAT_PATH, KINDS, Workload, request_body

log = logging.getLogger(__name__)

WORKLOAD = Workload.from_env()
PROMPTS = WORKLOAD.prompts()
RECORDER = Recorder()
_window: dict[str, float] = {}
_model: dict[str, str] = {}

if WORKLOAD.shape == "step":
    shapes.StepLoad.workload = WORKLOAD
    StepLoad = shapes.StepLoad  # Locust runs the shape class it finds here


class StreamError(Exception):
    """The server answered 200 but the stream was not a well-formed completion."""


def _headers() -> dict[str, str]:
    headers = {"Content-Type": "application/json"}
    if WORKLOAD.api_key:
        headers["Authorization"] = f"Bearer {WORKLOAD.api_key}"
    return headers


def _discover_model(host: str) -> str:
    """The model to ask for: the configured one, else the first /v1/models lists."""
    if WORKLOAD.model:
        return WORKLOAD.model
    try:
        resp = requests.get(host.rstrip("/") + "/v1/models", headers=_headers(), timeout=10)
        resp.raise_for_status()
        data = resp.json().get("data") or []
        if data and isinstance(data[0].get("id"), str):
            return str(data[0]["id"])
    except (requests.RequestException, ValueError) as exc:
        log.warning("could not list models at %s (%s); sending model 'default'", host, exc)
    return "default"


def _error_text(resp: requests.Response) -> str:
    try:
        body = resp.json()
    except ValueError:
        return f"HTTP {resp.status_code}"
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict) and err.get("message"):
        return f"HTTP {resp.status_code}: {err.get('type') or err.get('code') or 'error'}"
    if isinstance(body, dict) and body.get("object") == "error":  # SGLang's flat error body
        return f"HTTP {resp.status_code}: {body.get('type') or 'error'}"
    return f"HTTP {resp.status_code}"


def _text_of(choice: dict[str, Any]) -> str | None:
    """The new text of one choice: a chat delta's content or a completion's text."""
    delta = choice.get("delta")
    if isinstance(delta, dict):
        return delta.get("content") or None
    text = choice.get("text")
    return text if isinstance(text, str) and text else None


class _Progress:
    """What a request has seen so far; read on success, failure or when the run cuts it off."""

    def __init__(self, stream: bool) -> None:
        self.stream = stream
        self.started = time.perf_counter()
        self.first_token_at: float | None = None
        self.chunks = 0
        self.window_chunks = 0  # content chunks that arrived before the run was told to stop
        self.usage_tokens: int | None = None
        self.prompt_tokens = 0

    def on_usage(self, usage: Any) -> None:
        if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
            self.usage_tokens = usage["completion_tokens"]
            self.prompt_tokens = int(usage.get("prompt_tokens") or 0)

    def on_chunk(self, chunk: dict[str, Any]) -> None:
        if "error" in chunk:
            err = chunk["error"]
            kind = err.get("type") if isinstance(err, dict) else None
            raise StreamError(f"error in stream: {kind or err}")
        self.on_usage(chunk.get("usage"))
        for choice in chunk.get("choices") or ():
            if _text_of(choice):
                self.chunks += 1
                if "end" not in _window:
                    self.window_chunks += 1
                if self.first_token_at is None:
                    self.first_token_at = time.perf_counter()

    @property
    def tokens(self) -> int:
        return self.usage_tokens if self.usage_tokens is not None else self.chunks

    @property
    def ttft_ms(self) -> float | None:
        return None if self.first_token_at is None else (self.first_token_at - self.started) * 1000.0

    def window_tokens(self, finished: float) -> int | None:
        """Tokens generated before the window closed; None when the request finished inside it."""
        end = _window.get("end")
        if end is None or finished <= end:
            return None
        if self.stream:
            return self.window_chunks
        # Non-streaming: no arrival times; assume tokens came at an even pace over the request.
        share = (end - self.started) / (finished - self.started)
        return round(self.tokens * min(1.0, max(0.0, share)))


def _read_stream(resp: requests.Response, progress: _Progress) -> None:
    is_done = False
    for raw in resp.iter_lines():
        line = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else str(raw)
        if not line.startswith("data:"):
            continue
        payload = line[len("data:"):].strip()
        if payload == "[DONE]":
            is_done = True
            break
        try:
            chunk = json.loads(payload)
        except ValueError as exc:
            raise StreamError("malformed SSE chunk") from exc
        progress.on_chunk(chunk)
    if not is_done:
        raise StreamError("stream ended without [DONE]")
    if progress.first_token_at is None:
        raise StreamError("stream carried no tokens")


def _read_whole(resp: requests.Response, progress: _Progress) -> None:
    body = resp.json()
    progress.on_usage(body.get("usage") or {"completion_tokens": 0})
    if not body.get("choices"):
        raise StreamError("response has no choices")


def _task(kind: str) -> Callable[[OpenAIUser], None]:
    def run(user: OpenAIUser) -> None:
        user.send(kind)

    run.__name__ = kind.replace("-", "_")
    return run


class OpenAIUser(User):
    """One client sending the workload's mix of requests."""

    # The mix as Locust's task list (read when the class is made): each kind as often as its weight.
    tasks = [task for kind, weight in WORKLOAD.weights.items() for task in [_task(kind)] * weight]  # noqa: RUF012

    def on_start(self) -> None:
        self.session = requests.Session()
        self.rng = random.Random()
        self._pace: Callable[[User], float] | None = None
        options = self.environment.parsed_options
        users = int(getattr(options, "num_users", 0) or 1)
        if WORKLOAD.rate_rps:
            # Each user offers its share of the rate; a request slower than its share leaves no wait. The
            # users start at random points of one interval: all at once would be a burst, not the rate.
            interval = users / WORKLOAD.rate_rps
            self._pace = constant_pacing(interval)
            gevent.sleep(self.rng.uniform(0.0, interval))

    def wait_time(self) -> float:
        return 0.0 if self._pace is None else self._pace(self)

    def on_stop(self) -> None:
        self.session.close()

    def _fire(self, request_type: str, name: str, value: float, length: int, exc: Exception | None) -> None:
        self.environment.events.request.fire(
            request_type=request_type, name=name, response_time=value, response_length=length,
            exception=exc, context={},
        )

    def send(self, kind: str) -> None:
        assert self.host, "Locust needs --host (the server's base URL)"
        path, stream = KINDS[kind]
        prompt = self.rng.choice(PROMPTS)
        body = request_body(WORKLOAD, kind, _model.get("id", "default"), prompt, self.rng)
        progress = _Progress(stream)
        finished = False
        try:
            error: Exception | None = None
            try:
                with self.session.post(self.host.rstrip("/") + path, json=body, headers=_headers(),
                                       stream=stream, timeout=(10.0, WORKLOAD.request_timeout_s)) as resp:
                    if resp.status_code != 200:
                        error = StreamError(_error_text(resp))
                    elif stream:
                        _read_stream(resp, progress)
                    else:
                        _read_whole(resp, progress)
            except (requests.RequestException, StreamError, ValueError) as exc:
                error = exc if isinstance(exc, StreamError) else StreamError(type(exc).__name__)
            finished_at = time.perf_counter()
            e2e_ms = (finished_at - progress.started) * 1000.0
            finished = True
        finally:
            if not finished:
                # Locust stopped this user (GreenletExit) mid-request.
                RECORDER.cut_off(progress.window_chunks)
        if error is not None:
            RECORDER.failure(str(error))
            self._fire("POST", kind, e2e_ms, 0, error)
            return
        tokens = progress.tokens
        ttft_ms = progress.ttft_ms
        RECORDER.success(ttft_ms=ttft_ms, e2e_ms=e2e_ms, completion_tokens=tokens,
                         window_tokens=progress.window_tokens(finished_at),
                         prompt_tokens=progress.prompt_tokens)
        self._fire("POST", kind, e2e_ms, tokens, None)
        if ttft_ms is not None:
            self._fire("TTFT", kind, ttft_ms, 0, None)
            decode_s = (e2e_ms - ttft_ms) / 1000.0
            if tokens > 1 and decode_s > 0:
                self._fire("ITL", kind, decode_s * 1000.0 / (tokens - 1), tokens, None)
                self._fire("TOKENS/S", kind, (tokens - 1) / decode_s, tokens, None)


@events.test_start.add_listener
def _on_test_start(environment: Environment, **_: Any) -> None:
    _model["id"] = _discover_model(environment.host or "")
    _window["start"] = time.perf_counter()
    _window.pop("end", None)


@events.test_stopping.add_listener
def _on_test_stopping(environment: Environment, **_: Any) -> None:
    # Before users are stopped: the measured window ends here, not after in-flight requests are torn down.
    _window["end"] = time.perf_counter()
    runner = environment.runner
    _window["users"] = float(runner.user_count if runner is not None else 0)


@events.test_stop.add_listener
def _on_test_stop(environment: Environment, **_: Any) -> None:
    options = environment.parsed_options
    if options is not None and getattr(options, "csv_prefix", None):
        # Locust rewrites its CSV files once a second and not again at exit: let the writer make one more
        # pass so requests that finished while draining are in them.
        gevent.sleep(CSV_STATS_INTERVAL_SEC + 0.2)
    if not WORKLOAD.summary_path or "start" not in _window:
        return
    end = _window.get("end", time.perf_counter())
    duration_s = max(0.0, end - _window["start"])
    summary = RECORDER.summary(users=int(_window.get("users", 0)), duration_s=duration_s)
    summary.write(Path(WORKLOAD.summary_path))
    log.info("loadtest summary written to %s", WORKLOAD.summary_path)


__all__ = ["CHAT_PATH", "OpenAIUser"]
