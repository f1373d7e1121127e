"""Multi-node plans from a cluster YAML: SGLang ranks and llama.cpp RPC, printed by `--cluster --dry-run`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from quantize.bundled import smollm2_path
from server.cli import launch as launch_cli
from server.launch.cluster import ClusterSpec, cluster_commands, load_cluster
from server.launch.planner import make_plan
from server.launch.request import LaunchRequest
from server.launch.resolve import PlanError


@pytest.fixture
def maker(full_toolchain):  # type: ignore[no-untyped-def]
    """make_plan for the cluster's whole GPU set, on a machine with every backend installed."""
    from server.hardware.cards import GpuSet, get_card

    def make(request: LaunchRequest):  # type: ignore[no-untyped-def]
        target = GpuSet.of(get_card(request.card), request.gpus or 1)
        return make_plan(request, toolchain=full_toolchain, target=target)

    return make


def test_example_file_loads(repo) -> None:
    spec = load_cluster(repo / "server" / "launch" / "cluster.example.yaml")
    assert spec.backend == "sglang" and len(spec.nodes) == 2 and spec.total_gpus == 4


def test_sglang_nodes_parse_with_sglangs_parser(hf_model_dir, maker, sglang_parser) -> None:
    spec = ClusterSpec(
        backend="sglang",
        card="rtx-5090",
        gpus_per_node=2,
        model_path=str(hf_model_dir()),
        dist_init_addr="10.0.0.1:50000",
        nodes=({"host": "10.0.0.1"}, {"host": "10.0.0.2"}),
    )
    commands = cluster_commands(spec, LaunchRequest(), maker)
    assert [c.rank for c in commands] == [0, 1]
    for c in commands:
        ns = sglang_parser.parse_args(list(c.argv[3:]))
        assert ns.nnodes == 2 and ns.node_rank == c.rank
        assert ns.dist_init_addr == "10.0.0.1:50000"
        assert ns.tp_size == 4  # tensor parallel over every GPU of both nodes
        assert c.env["CUDA_VISIBLE_DEVICES"] == "0,1"


def test_llama_rpc_head_and_workers(maker) -> None:
    spec = ClusterSpec(
        backend="llama-server",
        card="tesla-p4",
        gpus_per_node=1,
        rpc_port=50052,
        nodes=({"host": "a"}, {"host": "b"}, {"host": "c"}),
    )
    head, *workers = cluster_commands(spec, LaunchRequest(), maker)
    assert head.argv[0].endswith("llama-server")
    rpc = head.argv[head.argv.index("--rpc") + 1]
    assert rpc == "b:50052,c:50052"
    # each worker binds its own address (rpc-server has no authentication): not every interface
    assert [w.argv for w in workers] == [("ggml-rpc-server", "-H", "b", "-p", "50052"),
                                         ("ggml-rpc-server", "-H", "c", "-p", "50052")]


def test_bad_cluster_file(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("backend: sglang\ncard: rtx-5090\nnodes:\n  - host: a\n")
    with pytest.raises(PlanError, match="nodes"):
        load_cluster(path)


def test_cli_prints_each_node(repo) -> None:
    app = typer.Typer()
    launch_cli.register(app)
    app.command("noop", hidden=True)(lambda: None)
    example = repo / "server" / "launch" / "cluster.example.yaml"
    model = str(smollm2_path())  # the example names a model this machine does not have
    result = CliRunner().invoke(
        app, ["launch", "--cluster", str(example), "--model", model, "--dry-run", "--json"]
    )
    assert result.exit_code == 0, result.output
    nodes = json.loads(result.stdout)["nodes"]
    assert [n["host"] for n in nodes] == ["10.0.0.1", "10.0.0.2"]
    assert all("--node-rank" in n["argv"] for n in nodes)
    result = CliRunner().invoke(app, ["launch", "--cluster", str(example)])
    assert result.exit_code == 2 and "--dry-run" in result.stderr
