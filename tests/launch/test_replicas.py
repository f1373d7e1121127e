"""Several boxes behind sglang-router, planned from one cluster file: what runs where, checked by the parsers
of the programs that will run it (sglang-router's, SGLang's, edgeserve's own launch and serve)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from quantize.bundled import smollm2_path
from server.cli import launch as launch_cli
from server.cli.serve import settings_from_argv
from server.launch.cluster_runner import remote_boxes_refused
from server.launch.plan import LaunchPlan
from server.launch.replicas import (
    ClusterPlan,
    ReplicaCluster,
    load_replica_cluster,
    plan_replica_cluster,
    ssh_argv,
)
from server.launch.request import LaunchRequest
from server.launch.resolve import PlanError

EDGESERVE = ("edgeserve",)


@pytest.fixture
def plan_cluster(plan_for: Callable[..., LaunchPlan]) -> Callable[[dict[str, object]], ClusterPlan]:
    """The cluster file's data -> its plan, every box planned for its named card (nothing detected)."""

    def make(request: LaunchRequest) -> LaunchPlan:
        flags = request.model_dump(exclude={"backend", "card", "gpus"}, exclude_none=True)
        return plan_for(request.card, request.backend, request.gpus, **flags)

    def plan(data: dict[str, object]) -> ClusterPlan:
        return plan_replica_cluster(ReplicaCluster.model_validate(data), make, edgeserve=EDGESERVE,
                                    python="python3")

    return plan


@pytest.fixture(scope="module")
def router_parse() -> Callable[[tuple[str, ...]], object]:
    """sglang-router 0.3.2's own parser over the arguments after `python -m sglang_router.launch_router`."""
    launch_router = pytest.importorskip("sglang_router.launch_router")

    def parse(argv: tuple[str, ...]) -> object:
        assert argv[1:3] == ("-m", "sglang_router.launch_router"), argv[:3]
        return launch_router.parse_router_args(list(argv[3:]))

    return parse


def _launch_dry_run(argv: tuple[str, ...]) -> dict[str, object]:
    """What `edgeserve launch ARGV --dry-run --json` plans on the box."""
    app = typer.Typer()
    launch_cli.register(app)
    app.command("noop", hidden=True)(lambda: None)
    assert argv[:2] == (*EDGESERVE, "launch"), argv
    result = CliRunner().invoke(app, ["launch", *argv[2:], "--dry-run", "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def test_example_file_plans(repo: Path, plan_cluster: Callable[..., ClusterPlan]) -> None:
    cluster = load_replica_cluster(repo / "server" / "launch" / "replicas.example.yaml")
    assert [b.card for b in cluster.boxes] == ["rtx-4090", "rtx-4090", "tesla-p4"]
    # The example names a model this machine does not have: plan it with the bundled one.
    data = cluster.model_dump(exclude_none=True) | {"model_path": str(smollm2_path())}
    data["boxes"] = [b | {"model_path": str(smollm2_path())} for b in data["boxes"]]
    plan = plan_cluster(data)
    assert [b.worker_url for b in plan.boxes] == [f"http://10.0.0.{i}:8000" for i in (1, 2, 3)]
    assert plan.boxes[2].plan.n_ctx == 2048 and plan.boxes[0].plan.n_ctx == 4096  # a box's own setting wins
    assert all(b.plan.model_name == "llama-3.1-8b-instruct" for b in plan.boxes)


def test_router_command_parses_with_the_routers_parser(plan_cluster, router_parse) -> None:  # type: ignore[no-untyped-def]
    plan = plan_cluster({"settings": {"n_parallel": 4},
                         "boxes": [{"host": "10.0.0.1", "card": "rtx-4090"},
                                   {"host": "10.0.0.2", "card": "tesla-p4", "n_parallel": 2}]})
    args = router_parse(plan.router.argv)
    assert args.worker_urls == ["http://10.0.0.1:8000", "http://10.0.0.2:8000"]
    assert args.policy == "cache_aware" and args.backend == "sglang"
    assert args.balance_abs_threshold == 2  # the smaller box's batch
    assert args.health_check_endpoint == "/ready" and args.health_check_interval_secs == 2
    assert args.retry_max_retries == 3  # one try per box and one more
    assert (args.cb_failure_threshold, args.cb_success_threshold, args.cb_timeout_duration_secs) == (3, 1, 10)
    reasons = {r.setting: r for r in plan.router.reasons}
    assert reasons["policy"].source == "derived" and "prefix" in reasons["policy"].why
    assert all(r.why for r in plan.router.reasons)


def test_router_settings_from_the_file_are_kept(plan_cluster, router_parse) -> None:  # type: ignore[no-untyped-def]
    plan = plan_cluster({"router": {"policy": "round_robin", "cb_timeout_duration_secs": 30, "port": 31000},
                         "boxes": [{"host": "a", "card": "cpu"}, {"host": "b", "card": "cpu"}]})
    args = router_parse(plan.router.argv)
    assert (args.policy, args.cb_timeout_duration_secs, args.port) == ("round_robin", 30, 31000)
    reason = next(r for r in plan.router.reasons if r.setting == "policy")
    assert (reason.source, reason.why) == ("profile", "router.policy in the cluster file")


def test_no_prefix_cache_means_round_robin(plan_cluster, router_parse) -> None:  # type: ignore[no-untyped-def]
    plan = plan_cluster({"boxes": [{"host": "a", "card": "cpu"}, {"host": "b", "card": "cpu"}]})
    assert router_parse(plan.router.argv).policy == "cache_aware"
    no_cache = plan.boxes[1].plan.model_copy(update={"prefix_cache": False})
    from server.launch.router import RouterSettings, router_plan

    router = router_plan(RouterSettings(), (plan.boxes[0].plan, no_cache), ("http://a:8000", "http://b:8000"),
                         "python3")
    assert router_parse(router.argv).policy == "round_robin"


def test_embedded_box_is_one_launch_that_plans_the_same(plan_cluster) -> None:  # type: ignore[no-untyped-def]
    plan = plan_cluster({"model_name": "smol", "settings": {"n_ctx": 1024, "n_parallel": 3, "n_threads": 1},
                         "boxes": [{"host": "127.0.0.1", "port": 8101}, {"host": "10.0.0.9", "card": "cpu"}]})
    local, remote = plan.boxes
    assert (local.is_local, remote.is_local) == (True, False)
    (command,) = local.commands
    box = _launch_dry_run(command.argv)
    settings = (box["backend"], box["n_ctx"], box["n_parallel"], box["model_name"])
    assert settings == ("embedded", 1024, 3, "smol")
    assert (box["host"], box["port"]) == ("127.0.0.1", 8101)
    assert box["argv"][-2:] == ["--model-name", "smol"]  # the gateway serves the cluster's id
    # a remote box listens for the router
    assert _launch_dry_run(remote.commands[0].argv)["host"] == "0.0.0.0"


def test_llama_server_box_has_a_gateway_in_front(plan_cluster, clean_env) -> None:  # type: ignore[no-untyped-def]
    plan = plan_cluster({"model_name": "m", "boxes": [
        {"host": "10.0.0.3", "card": "tesla-p4", "backend": "llama-server", "backend_port": 8081}]})
    (box,) = plan.boxes
    backend, gateway = box.commands
    assert backend.argv[:5] == ("edgeserve", "launch", "--backend", "llama-server", "--card")
    assert backend.argv[backend.argv.index("--host") + 1] == "127.0.0.1"  # only its own gateway reaches it
    # The printed plan is the backend's own: loopback, backend_port, the cluster's model id.
    assert (box.plan.host, box.plan.port, box.plan.argv[-2:]) == ("127.0.0.1", 8081, ("--alias", "m"))
    settings = settings_from_argv(list(gateway.argv[2:]))
    assert (settings.backend, settings.upstream_url, settings.model_name) == ("openai", "http://127.0.0.1:8081",
                                                                              "m")
    assert (settings.host, settings.port) == ("0.0.0.0", 8000)
    assert (settings.engine.n_parallel, settings.engine.n_ctx) == (box.plan.n_parallel, box.plan.n_ctx)


def test_sglang_box_serves_the_cluster_id(plan_cluster, hf_model_dir, sglang_parse) -> None:  # type: ignore[no-untyped-def]
    plan = plan_cluster({"model_path": str(hf_model_dir()), "model_name": "llama8b",
                         "boxes": [{"host": "10.0.0.4", "card": "rtx-5090", "backend": "sglang"}]})
    assert sglang_parse(plan.boxes[0].plan).served_model_name == "llama8b"


def test_remote_boxes_start_over_ssh_only_when_asked(plan_cluster) -> None:  # type: ignore[no-untyped-def]
    plan = plan_cluster({"boxes": [{"host": "127.0.0.1"}, {"host": "10.0.0.2", "ssh": "ops@box2"}]})
    # No model_name given: every box serves the model file's name, and says so on its command line.
    assert plan.model_name == smollm2_path().stem
    assert all(b.plan.argv[-2:] == ("--model-name", plan.model_name) for b in plan.boxes)
    assert [b.host for b in remote_boxes_refused(plan, use_ssh=False)] == ["10.0.0.2"]
    assert remote_boxes_refused(plan, use_ssh=True) == []
    argv = ssh_argv(plan.boxes[1].ssh, plan.boxes[1].commands[0])
    assert argv[:5] == ("ssh", "-o", "BatchMode=yes", "-tt", "ops@box2")
    assert argv[5].startswith("edgeserve launch --backend embedded")


@pytest.mark.parametrize(("data", "problem"), [
    ({"boxes": []}, "boxes"),
    ({"boxes": [{"host": "a"}, {"host": "a"}]}, "share a gateway address"),
    ({"boxes": [{"host": "a", "port": 9000, "backend_port": 9000}]}, "backend_port"),
    ({"boxes": [{"host": "a", "n_ctx": -1}]}, "n_ctx"),
    ({"boxes": [{"host": "a"}], "router": {"policy": "fastest"}}, "policy"),
])
def test_bad_cluster_files(tmp_path: Path, data: dict[str, object], problem: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(json.dumps(data))
    with pytest.raises(PlanError, match=problem):
        load_replica_cluster(path)


def test_a_box_that_cannot_be_planned_is_named(plan_cluster) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(PlanError, match=r"box 10\.0\.0\.5"):
        plan_cluster({"boxes": [{"host": "10.0.0.5", "card": "tesla-p4", "backend": "sglang"}]})


def test_cli_plan_prints_every_box_and_the_router(tmp_path: Path) -> None:
    from server.cli.app import app

    path = tmp_path / "cluster.yaml"
    path.write_text(json.dumps({"settings": {"n_parallel": 2},
                                "boxes": [{"host": "127.0.0.1", "port": 8101}, {"host": "10.0.0.2"}]}))
    result = CliRunner().invoke(app, ["cluster", "plan", str(path), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [b["worker_url"] for b in data["boxes"]] == ["http://127.0.0.1:8101", "http://10.0.0.2:8000"]
    assert data["boxes"][1]["commands"][0]["command"].startswith("ssh -o BatchMode=yes -tt 10.0.0.2 ")
    assert data["router"]["argv"][3:5] == ["--worker-urls", "http://127.0.0.1:8101"]
    assert CliRunner().invoke(app, ["cluster", "plan", str(tmp_path / "missing.yaml")]).exit_code == 2
