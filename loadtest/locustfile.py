"""Locust users that chat with an OpenAI-compatible server (edgeserve, llama-server, SGLang) and time it.

    locust -f loadtest/locustfile.py --headless -u 8 -r 8 -t 60s --host http://127.0.0.1:8000 --csv out/run

Each user sends /v1/chat/completions back to back (closed loop: users = concurrency), streaming by default.
Besides Locust's usual row (request_type POST; response_time = whole request, response_length = completion
tokens) it fires two custom events per request so they show in the UI and the CSV:
  * request_type "TTFT", name "/v1/chat/completions": response_time is the time to the first content
    token (ms);
  * request_type "TOKENS/S", name "decode": response_time holds the tokens per second that request streamed
    after its first token (a rate in the milliseconds column: Locust has no other numeric column).
The request is shaped by EDGESERVE_LOADTEST_* variables (see loadtest/workload.py): PROMPT_TOKENS,
MAX_TOKENS, STREAM, IGNORE_EOS, TEMPERATURE, MODEL, API_KEY, REQUEST_TIMEOUT_S. With
EDGESERVE_LOADTEST_SUMMARY_PATH set, a JSON summary (TTFT and latency samples, aggregate tokens/s,
errors) is written there when the test stops. With --stop-timeout, requests running when the time is up
finish and count for latency and errors; throughput counts only tokens generated before the stop.
"""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path
from typing import Any

import gevent
import requests
from locust import User, constant, events, task
from locust.env import Environment
from locust.stats import CSV_STATS_INTERVAL_SEC

from loadtest.summary import Recorder
from loadtest.workload import Workload, chat_body

log = logging.getLogger(__name__)

CHAT_PATH = "/v1/chat/completions"
WORKLOAD = Workload.from_env()
RECORDER = Recorder()
_window: dict[str, float] = {}
_model: dict[str, str] = {}


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


class _Progress:
    """What a request has seen so far; read on success, failure or when the run cuts it off."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.first_token_at: float | None = None
        self.chunks = 0
        self.window_chunks = 0  # content chunks that arrived before the run was told to stop
        self.usage_tokens: int | None = None

    def on_chunk(self, chunk: dict[str, Any]) -> None:
        if "error" in chunk:
            err = chunk["error"]
            kind = err.get("type") if isinstance(err, dict) else None
            raise StreamError(f"error in stream: {kind or err}")
        usage = chunk.get("usage")
        if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
            self.usage_tokens = usage["completion_tokens"]
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta") or {}
            if delta.get("content"):
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
        if WORKLOAD.stream:
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
    usage = body.get("usage") or {}
    progress.usage_tokens = int(usage.get("completion_tokens") or 0)
    if not body.get("choices"):
        raise StreamError("response has no choices")


class ChatUser(User):
    """One client sending chat completions back to back."""

    wait_time = constant(0)

    def on_start(self) -> None:
        self.session = requests.Session()
        self.rng = random.Random()

    def on_stop(self) -> None:
        self.session.close()

    def _fire(self, request_type: str, name: str, value: float, length: int, exc: Exception | None) -> None:
        self.environment.events.request.fire(
            request_type=request_type, name=name, response_time=value, response_length=length,
            exception=exc, context={},
        )

    @task
    def chat(self) -> None:
        assert self.host, "Locust needs --host (the server's base URL)"
        body = chat_body(WORKLOAD, _model.get("id", "default"), self.rng)
        progress = _Progress()
        finished = False
        try:
            error: Exception | None = None
            try:
                with self.session.post(self.host.rstrip("/") + CHAT_PATH, json=body, headers=_headers(),
                                       stream=WORKLOAD.stream,
                                       timeout=(10.0, WORKLOAD.request_timeout_s)) as resp:
                    if resp.status_code != 200:
                        error = StreamError(_error_text(resp))
                    elif WORKLOAD.stream:
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
            self._fire("POST", CHAT_PATH, e2e_ms, 0, error)
            return
        tokens = progress.tokens
        ttft_ms = progress.ttft_ms
        RECORDER.success(ttft_ms=ttft_ms, e2e_ms=e2e_ms, completion_tokens=tokens,
                         window_tokens=progress.window_tokens(finished_at))
        self._fire("POST", CHAT_PATH, e2e_ms, tokens, None)
        if ttft_ms is not None:
            self._fire("TTFT", CHAT_PATH, ttft_ms, 0, None)
            decode_s = (e2e_ms - ttft_ms) / 1000.0
            if tokens > 1 and decode_s > 0:
                self._fire("TOKENS/S", "decode", (tokens - 1) / decode_s, tokens, None)


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
