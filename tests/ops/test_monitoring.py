"""Prometheus files: promtool accepts them, the rule unit tests pass, and every metric they name exists."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient
from prometheus_client import generate_latest

from server.gateway.app import create_app
from server.gateway.metrics import GatewayMetrics
from server.gateway.reliability_metrics import ChainMetrics, MemberSnapshot
from server.gateway.settings import GatewaySettings
from server.hardware.detect import GpuSample

ROOT = Path(__file__).resolve().parents[2]
PROM_DIR = ROOT / "monitoring" / "prometheus"
RULES = PROM_DIR / "edgeserve_rules.yml"
# Series Prometheus itself makes, not the gateway.
PROMETHEUS_OWN = {"up"}

promtool = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    promtool is None,
    reason="promtool not installed (Debian package `prometheus`); run_tests.sh installs it when run as root",
)


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert promtool is not None
    return subprocess.run([promtool, *args], capture_output=True, text=True, timeout=120, check=False,
                          cwd=PROM_DIR)


@needs_promtool
def test_promtool_accepts_the_rules() -> None:
    proc = _promtool("check", "rules", RULES.name)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


@needs_promtool
def test_promtool_accepts_the_scrape_config() -> None:
    proc = _promtool("check", "config", "prometheus.yml")
    assert proc.returncode == 0, proc.stdout + proc.stderr


@needs_promtool
def test_alerts_fire_on_the_series_that_should_trigger_them() -> None:
    proc = _promtool("test", "rules", "tests/edgeserve_rules_test.yml")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _rules() -> list[dict[str, object]]:
    doc = yaml.safe_load(RULES.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def test_rules_cover_what_an_operator_needs() -> None:
    alerts = {str(r["alert"]) for r in _rules() if "alert" in r}
    expected = {"EdgeserveGatewayDown", "EdgeserveBackendDown", "EdgeserveHighErrorRate",
                "EdgeserveSlowFirstToken", "EdgeserveQueueSaturated", "EdgeserveLoadShedding",
                "EdgeservePreemptions", "EdgeserveFallbacks", "EdgeserveGpuMemoryHigh", "EdgeserveGpuHot"}
    assert expected <= alerts
    for rule in _rules():
        if "alert" in rule:
            labels = rule.get("labels")
            assert isinstance(labels, dict), rule
            assert labels.get("severity") in {"info", "warning", "critical"}, rule
            annotations = rule.get("annotations")
            assert isinstance(annotations, dict) and annotations.get("summary"), rule


def _metric_names_in_rules() -> set[str]:
    names: set[str] = set()
    for rule in _rules():
        names.update(re.findall(r"\b(edgeserve_[a-z0-9_]+)\b", str(rule["expr"])))
    return names


def _exposed_names(text: str) -> set[str]:
    """Every sample name a /metrics page can carry, including families that have no sample yet."""
    names: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            names.add(name)
            if kind == "histogram":
                names.update({f"{name}_bucket", f"{name}_sum", f"{name}_count"})
            if kind == "counter" and not name.endswith("_total"):
                names.add(f"{name}_total")
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


@pytest.fixture(scope="module")
def gateway_metrics_page() -> str:
    """/metrics of a real gateway over the bundled model, after one streamed chat completion."""
    settings = GatewaySettings(parallel=2, ctx=512, enable_gpu_metrics=False)
    with TestClient(create_app(settings)) as client:
        deadline = time.monotonic() + 120
        while client.get("/ready").status_code != 200:
            assert time.monotonic() < deadline, client.get("/ready").json()
            time.sleep(0.1)
        body = {"model": "edgeserve", "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4,
                "stream": True}
        with client.stream("POST", "/v1/chat/completions", json=body) as resp:
            assert resp.status_code == 200
            assert any("[DONE]" in line for line in resp.iter_lines())
        return client.get("/metrics").text


def test_every_metric_the_rules_use_is_exposed(gateway_metrics_page: str) -> None:
    exposed = _exposed_names(gateway_metrics_page)
    # GPU gauges appear only where NVML sees a GPU: render them from the gateway's collector with a sample.
    gpu = GatewayMetrics(gpu_sampler=lambda: [GpuSample(index=0, name="Tesla P4", memory_used_bytes=1 << 30,
                                                         memory_total_bytes=8 << 30, utilization_gpu_pct=50,
                                                         temperature_c=60, power_draw_w=40.0)])
    exposed |= _exposed_names(gpu.render().decode())
    # Fallback-chain metrics appear only when a chain of backends is configured.
    chain = ChainMetrics()
    chain.watch(lambda: [MemberSnapshot(name="llama-server", breaker_state="closed", is_available=True,
                                        in_flight=0, waiting=0, slots=4)])
    exposed |= _exposed_names(generate_latest(chain.registry).decode())

    missing = sorted(_metric_names_in_rules() - exposed - PROMETHEUS_OWN)
    assert not missing, f"rules use metrics the gateway does not export: {missing}"
    assert "edgeserve_time_to_first_token_seconds_bucket" in _metric_names_in_rules()
