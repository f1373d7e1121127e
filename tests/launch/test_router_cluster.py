"""Three `edgeserve` boxes with the bundled model on 127.0.0.1 behind a real sglang-router, started the way
`edgeserve cluster up` starts them (server.launch.cluster_runner). The tests run in file order and share the
cluster: answers through the router -> load spread -> prefix affinity -> kill -9 of a box under load.

Which box served a request is read from the boxes' own /metrics (edgeserve_requests_total per box); the
router's view from its Prometheus endpoint (smg_*). Counts and states only: no wall times are compared.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import openai
import pytest

from loadtest.servers import free_port, metric_value
from server.launch.cluster_runner import ClusterRunner
from server.launch.planner import make_plan
from server.launch.process import children
from server.launch.replicas import ClusterPlan, ReplicaCluster, plan_replica_cluster
from server.launch.toolchain import probe_toolchain

pytest.importorskip("sglang_router", reason="sglang-router (edgeserve[cluster]) is not installed")

BOXES = 3
SLOTS = 2  # n_parallel of every box
MODEL = "smollm2"
CHAT = "/v1/chat/completions"
TIMEOUT_S = 180.0


@dataclass
class Cluster:
    plan: ClusterPlan
    runner: ClusterRunner

    @property
    def url(self) -> str:
        return self.plan.router.url

    def client(self) -> openai.OpenAI:
        # No client-side retries: every retry seen here is the router's.
        return openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0, timeout=TIMEOUT_S)

    def served(self) -> list[float]:
        """Chat completions each box answered with 200, from its own /metrics."""
        texts = [httpx.get(b.worker_url + "/metrics", timeout=10).text for b in self.plan.boxes]
        return [metric_value(t, "edgeserve_requests_total", route=CHAT, status="200") for t in texts]

    def box_metric(self, box: int, name: str) -> float:
        return metric_value(httpx.get(self.plan.boxes[box].worker_url + "/metrics", timeout=10).text, name)

    def router_metric(self, name: str, **labels: str) -> float:
        return metric_value(httpx.get(self.plan.router.metrics_url, timeout=10).text, name, **labels)

    def gateway_pid(self, box: int) -> int:
        """The box's `edgeserve serve` process: the child of its `edgeserve launch` supervisor."""
        supervisor = self.runner.started[box].process.pid
        assert supervisor is not None
        (pid,) = children(supervisor)
        return pid


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("router_cluster")
    spec = ReplicaCluster.model_validate({
        "model_name": MODEL,
        # One engine thread per box: three boxes share two cores (see tests/gateway/conftest.py).
        "settings": {"n_ctx": 1024, "n_parallel": SLOTS, "n_threads": 1},
        "router": {"port": free_port(), "prometheus_port": free_port()},
        "boxes": [{"host": "127.0.0.1", "port": free_port()} for _ in range(BOXES)],
    })
    toolchain = probe_toolchain()
    plan = plan_replica_cluster(spec, lambda r: make_plan(r, toolchain=toolchain),
                                edgeserve=toolchain.edgeserve, python=toolchain.python)
    runner = ClusterRunner(plan, log_dir=tmp, ready_timeout_s=TIMEOUT_S)
    runner.start()
    try:
        yield Cluster(plan=plan, runner=runner)
    finally:
        runner.stop()


def test_openai_client_gets_answers_through_the_router(cluster: Cluster) -> None:
    client = cluster.client()
    assert [m.id for m in client.models.list().data] == [MODEL]  # the id every box reports
    answer = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Name three "
                                            "colors."}], max_tokens=12, temperature=0)
    assert answer.choices[0].message.content and answer.usage is not None
    chunks = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                                 max_tokens=8, temperature=0, stream=True))
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] in (
        ["length"], ["stop"])
    workers = httpx.get(cluster.url + "/workers", timeout=10).json()["workers"]
    assert sorted(w["url"] for w in workers) == sorted(b.worker_url for b in cluster.plan.boxes)
    assert all(w["model_id"] == MODEL and w["is_healthy"] for w in workers)
    # The router reads every box's /get_load (-1 would mean it could not parse it).
    loads = httpx.get(cluster.url + "/get_loads", timeout=10).json()["workers"]
    assert len(loads) == BOXES and all(w["load"] >= 0 for w in loads)


def _async_client(cluster: Cluster) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=cluster.url + "/v1", api_key="none", max_retries=0, timeout=TIMEOUT_S)


async def _concurrent(cluster: Cluster, n: int) -> None:
    async with _async_client(cluster) as client:
        await asyncio.gather(*(client.chat.completions.create(
            model=MODEL, max_tokens=16, temperature=0,
            messages=[{"role": "user", "content": f"Question {i}: what is {i} + {i}?"}]) for i in range(n)))


def test_load_spreads_over_the_boxes(cluster: Cluster) -> None:
    before = cluster.served()
    n = 4 * BOXES
    # All at once, with prompts alike: cache_aware would keep them together, but one box soon has a full
    # batch (balance_abs_threshold) more in flight than the others, and the router sends the rest elsewhere.
    asyncio.run(_concurrent(cluster, n))
    gained = [after - b for after, b in zip(cluster.served(), before, strict=True)]
    assert sum(gained) == n
    assert all(g >= 1 for g in gained), gained


def _system_prompt(topic: str) -> str:
    words = " ".join(f"{topic}-{i}" for i in range(60))
    return f"You are a careful assistant for the {topic} team. Reference words: {words}."


def test_a_prefix_goes_back_to_the_box_that_holds_it(cluster: Cluster) -> None:
    client = cluster.client()
    for topic in ("geology", "astronomy", "botany"):
        before = cluster.served()
        reused_before = [cluster.box_metric(b, "edgeserve_prefix_reused_tokens_total") for b in range(BOXES)]
        for question in ("What do you study?", "Name one tool you use.", "Where do you work?"):
            client.chat.completions.create(model=MODEL, max_tokens=4, temperature=0, messages=[
                {"role": "system", "content": _system_prompt(topic)}, {"role": "user", "content": question}])
        gained = [after - b for after, b in zip(cluster.served(), before, strict=True)]
        assert sorted(gained) == [0] * (BOXES - 1) + [3], (topic, gained)  # all three on one box
        box = gained.index(3)
        reused = cluster.box_metric(box, "edgeserve_prefix_reused_tokens_total") - reused_before[box]
        assert reused >= 2 * 150, (topic, reused)  # the 2nd and 3rd took the system prompt from its cache


Outcomes = tuple[int, list[object], list[object]]


async def _load(cluster: Cluster, requests: int, streams: int) -> Outcomes:
    async with _async_client(cluster) as client:
        return await _load_with(client, cluster, requests, streams)


async def _load_with(client: openai.AsyncOpenAI, cluster: Cluster, requests: int, streams: int) -> Outcomes:
    async def one(i: int) -> object:
        try:
            r = await client.chat.completions.create(model=MODEL, max_tokens=24, temperature=0, messages=[
                {"role": "user", "content": f"Request {i}: count from {i} to {i + 20}."}])
            return r.choices[0].finish_reason
        except openai.APIError as exc:
            return exc

    async def stream(i: int) -> object:
        finish = None
        try:
            s = await client.chat.completions.create(model=MODEL, max_tokens=48, temperature=0, stream=True,
                                                     messages=[{"role": "user", "content": f"Story {i}."}])
            async for chunk in s:
                if chunk.choices and chunk.choices[0].finish_reason:
                    finish = chunk.choices[0].finish_reason
            return finish
        except openai.APIError as exc:
            return exc

    tasks = [asyncio.create_task(one(i)) for i in range(requests)]
    stream_tasks = [asyncio.create_task(stream(i)) for i in range(streams)]
    # Kill the busiest box once it has a full batch running (its slots) and maybe more in its queue.
    victim, busiest = 0, 0.0
    for _ in range(200):
        await asyncio.sleep(0.1)
        in_flight = [cluster.box_metric(b, "edgeserve_requests_in_flight") for b in range(BOXES)]
        victim, busiest = max(enumerate(in_flight), key=lambda x: x[1])
        if busiest >= 2:
            break
    assert busiest >= 1, "no box had a request in flight"
    os.kill(cluster.gateway_pid(victim), signal.SIGKILL)
    return victim, list(await asyncio.gather(*tasks)), list(await asyncio.gather(*stream_tasks))


def test_kill9_of_a_box_under_load(cluster: Cluster) -> None:
    retries_before = cluster.router_metric("smg_worker_retries_total")
    victim, answers, streams = asyncio.run(_load(cluster, requests=5 * BOXES, streams=BOXES))
    url = cluster.plan.boxes[victim].worker_url

    # Every non-streamed request was answered: those on the killed box were retried on the others.
    assert all(a in ("length", "stop") for a in answers), answers
    assert cluster.router_metric("smg_worker_retries_total") > retries_before
    # A stream already under way on the killed box cannot be retried by the router: its client sees the
    # connection drop (openai.APIConnectionError), never a stream that just ends without a finish_reason.
    assert all(s in ("length", "stop") or isinstance(s, openai.APIConnectionError) for s in streams), streams

    # The router stopped sending to the box: its breaker opened on the failures.
    assert cluster.router_metric("smg_worker_cb_transitions_total", worker=url, to="open") >= 1

    # The box's supervisor restarts its gateway; the router takes it back once its breaker lets a request
    # through (cb_timeout_duration_secs) and the box answers. cache_aware sends a prompt with no cached prefix
    # to the box with the least cached, which need not be the restarted one (the router may keep what it had
    # routed there): so the pings go in waves of twice the boxes' slots, and once the live boxes run more than
    # balance_abs_threshold requests beyond the restarted one the router gives it the next by load.
    client = cluster.client()
    deadline = time.monotonic() + 120
    served = 0.0

    def ping(_: int) -> None:
        client.chat.completions.create(model=MODEL, max_tokens=16, temperature=0,
                                       extra_body={"ignore_eos": True},
                                       messages=[{"role": "user", "content": f"{uuid.uuid4().hex} ping"}])

    while time.monotonic() < deadline and served == 0:
        with ThreadPoolExecutor(2 * BOXES * SLOTS) as pool:
            list(pool.map(ping, range(2 * BOXES * SLOTS)))
        try:
            served = cluster.served()[victim]  # the restarted gateway counts from zero
        except httpx.HTTPError:
            time.sleep(0.5)
    assert served >= 1, "the restarted box never got a request back"
    assert cluster.router_metric("smg_worker_health", worker=url) == 1
