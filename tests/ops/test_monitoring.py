"""Prometheus files: promtool accepts them, the rule unit tests pass, and every metric they name exists."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

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


def test_every_metric_the_rules_use_is_exposed(gateway_metric_names: set[str]) -> None:
    """Against what a running gateway exports (tests/ops/conftest.py: a real `edgeserve serve`)."""
    missing = sorted(_metric_names_in_rules() - gateway_metric_names - PROMETHEUS_OWN)
    assert not missing, f"rules use metrics the gateway does not export: {missing}"
    assert "edgeserve_time_to_first_token_seconds_bucket" in _metric_names_in_rules()
