"""monitoring/grafana/edgeserve.json: every panel's query names metrics a running gateway exports, every query
is PromQL that Prometheus' own parser accepts, and the panels cover what an operator watches."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "monitoring" / "grafana" / "edgeserve.json"
METRIC = re.compile(r"\b(edgeserve_[a-z0-9_]+)\b")
# What Grafana substitutes before a query reaches Prometheus (a rate window and the job variable).
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$job": ".*"}

promtool = shutil.which("promtool")


def _dashboard() -> dict[str, Any]:
    data = json.loads(DASHBOARD.read_text())
    assert isinstance(data, dict)
    return data


def _panels() -> list[dict[str, Any]]:
    return [p for p in _dashboard()["panels"] if p["type"] != "row"]


def _queries() -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in _panels() for t in p["targets"]]


def test_the_dashboard_is_well_formed() -> None:
    dash = _dashboard()
    assert dash["uid"] and dash["title"] == "edgeserve" and isinstance(dash["schemaVersion"], int)
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    source = {v["name"]: v for v in dash["templating"]["list"]}["datasource"]
    assert source["type"] == "datasource" and source["query"] == "prometheus"
    for panel in _panels():
        assert panel["targets"], panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in panel["targets"]:
            assert METRIC.search(target["expr"]), (panel["title"], target["expr"])


def test_every_panel_query_names_a_metric_the_gateway_exports(gateway_metric_names: set[str]) -> None:
    missing = sorted({(title, name) for title, expr in _queries() for name in METRIC.findall(expr)
                      if name not in gateway_metric_names})
    assert not missing, f"panels query metrics the gateway does not export: {missing}"


def test_the_panels_cover_what_an_operator_watches() -> None:
    used = {name for _, expr in _queries() for name in METRIC.findall(expr)}
    wanted = {
        "edgeserve_time_to_first_token_seconds_bucket", "edgeserve_inter_token_latency_seconds_bucket",
        "edgeserve_generation_tokens_total", "edgeserve_queue_depth", "edgeserve_engine_batch_size_bucket",
        "edgeserve_kv_cache_usage_ratio", "edgeserve_preemptions_total", "edgeserve_fallbacks_total",
        "edgeserve_breaker_state", "edgeserve_gpu_memory_used_bytes", "edgeserve_gpu_utilization_ratio",
        "edgeserve_gpu_temperature_celsius", "edgeserve_gpu_power_watts",
    }
    assert wanted <= used, wanted - used
    ttft = " ".join(expr for _, expr in _queries() if "time_to_first_token" in expr)
    assert set(re.findall(r"histogram_quantile\(([0-9.]+)", ttft)) >= {"0.5", "0.95", "0.99"}


@pytest.mark.skipif(promtool is None, reason="promtool not installed (Debian package `prometheus`); "
                                             "run_tests.sh installs it when run as root")
def test_promtool_parses_every_panel_query(tmp_path: Path) -> None:
    """Each query, with Grafana's variables filled in, becomes a recording rule for `promtool check rules`."""
    rules = []
    for i, (_, expr) in enumerate(_queries()):
        for variable, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, expr
        rules.append({"record": f"edgeserve:dashboard_query_{i}", "expr": expr})
    path = tmp_path / "dashboard_queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    assert promtool is not None
    proc = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60,
                          check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"{len(rules)} rules found" in proc.stdout
