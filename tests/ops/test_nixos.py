"""The NixOS module: every .nix file parses, and the module is evaluated with nix-instantiate against a small
stand-in for nixpkgs' lib and packages (tests/ops/nix/): its options, their types and defaults, the unit it
makes (the `edgeserve launch` command line, which `edgeserve launch --dry-run` then accepts, the stop timeout
after the gateway's drain, llama.cpp on PATH) and the Prometheus / Grafana wiring.

Not evaluated here (no nixpkgs on these machines): nixpkgs' own option merging and type checks, the real
llama-cpp derivation and its CUDA build, the generated systemd unit file, hardware.nvidia and the renamed
options (mkRenamedOptionModule)."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from server.cli import launch
from server.hardware.cards import card_ids
from server.launch.registry import backend_choices
from server.launch.request import LaunchRequest

ROOT = Path(__file__).resolve().parents[2]
EVAL = ROOT / "tests" / "ops" / "nix" / "eval_module.nix"
NIX_FILES = sorted(p for p in ROOT.rglob("*.nix") if ".venv" not in p.parts)

nix_instantiate = shutil.which("nix-instantiate")
needs_nix = pytest.mark.skipif(
    nix_instantiate is None,
    reason="nix-instantiate not installed (Debian package `nix-bin`); run_tests.sh installs it as root",
)


def _nix_value(settings: dict[str, Any]) -> str:
    """A Nix expression for a settings dict (JSON is close to Nix; attribute sets need `=` and `;`)."""
    if isinstance(settings, dict):
        return "{ " + " ".join(f"{k} = {_nix_value(v)};" for k, v in settings.items()) + " }"
    if isinstance(settings, bool):
        return "true" if settings else "false"
    if isinstance(settings, list):
        return "[ " + " ".join(_nix_value(v) for v in settings) + " ]"
    return json.dumps(settings)


def _evaluate(settings: dict[str, Any] | None = None, *, example: bool = False) -> dict[str, Any]:
    assert nix_instantiate is not None
    args = ["--arg", "example", "true"] if example else ["--arg", "settings", _nix_value(settings or {})]
    proc = subprocess.run([nix_instantiate, "--eval", "--strict", "--json", str(EVAL), *args],
                          capture_output=True, text=True, timeout=120, check=False)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.strip().splitlines()[-2:])
    data = json.loads(proc.stdout)
    assert isinstance(data, dict)
    return data


def _unit(data: dict[str, Any]) -> dict[str, Any]:
    unit = data["config"]["systemd"]["services"]["edgeserve"]
    assert isinstance(unit, dict)
    return unit


def _launch_argv(data: dict[str, Any]) -> list[str]:
    """ExecStart after the executable, with the runtime status file pointed elsewhere."""
    program, *argv = shlex.split(_unit(data)["serviceConfig"]["ExecStart"])
    assert program.endswith("/bin/edgeserve")
    assert argv[0] == "launch"
    return argv[1:]


def _dry_run(argv: list[str], status: Path) -> dict[str, Any]:
    argv = [status.as_posix() if a == "/run/edgeserve/status.json" else a for a in argv]
    app = typer.Typer()
    launch.register(app)
    result = CliRunner().invoke(app, [*argv, "--dry-run", "--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert isinstance(plan, dict)
    return plan


@needs_nix
@pytest.mark.parametrize("path", NIX_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_nix_file_parses(path: Path) -> None:
    assert nix_instantiate is not None
    proc = subprocess.run([nix_instantiate, "--parse", str(path)], capture_output=True, text=True, timeout=60,
                          check=False)
    assert proc.returncode == 0, proc.stderr


def test_the_nix_files_are_the_ones_expected() -> None:
    names = {p.relative_to(ROOT).as_posix() for p in NIX_FILES}
    assert {"phase0_nixos/edgeserve.nix", "phase0_nixos/example_configuration.nix",
            "tests/ops/nix/eval_module.nix"} <= names


@needs_nix
def test_the_options_carry_the_launch_settings() -> None:
    options = _evaluate()["options"]
    # Every setting `edgeserve launch` takes has an option of the same name (the model is `model`, the API key
    # goes through environmentFile as EDGESERVE_API_KEY).
    wanted = set(LaunchRequest.model_fields) - {"model_path", "api_key"}
    assert wanted <= set(options), wanted - set(options)
    assert {"model", "extraArgs", "environmentFile", "openFirewall", "nvidiaPersistenced",
            "venv", "package"} <= set(options)
    assert set(options["llamaCpp"]) == {"enable", "package"}
    assert options["llamaCpp"]["package"]["default"] == {"package": "llama-cpp",
                                                         "overriddenWith": {"cudaSupport": True}}
    assert options["prometheus"]["enable"]["default"] is False
    assert options["grafana"]["enable"]["default"] is False
    assert set(options["backend"]["values"]) == set(backend_choices())
    assert set(options["flash_attn"]["values"]) == {"on", "off", "auto"}
    assert options["shutdown_grace_s"]["default"] == 30
    assert options["gateway"]["default"] is True and options["force"]["default"] is False
    for name in ("n_ctx", "n_parallel", "n_batch", "n_ubatch", "n_threads"):
        assert options[name]["type"] == "null or positive integer", name
        assert options[name]["default"] is None
    assert "ONE sequence" in options["n_ctx"]["description"]


@needs_nix
def test_a_disabled_service_defines_nothing() -> None:
    assert _evaluate({"enable": False})["config"] is None  # the whole config sits behind mkIf cfg.enable


@needs_nix
def test_the_unit_runs_launch_with_every_setting(tmp_path: Path) -> None:
    settings = {"enable": True, "backend": "llama-server", "card": "tesla-p4", "n_ctx": 4096, "n_parallel": 4,
                "n_batch": 512, "n_ubatch": 256, "kv_type": "q8_0", "flash_attn": "on", "kv_unified": True,
                "n_threads": 2, "n_gpu_layers": 20, "shutdown_grace_s": 45,
                "model_name": "llama", "backend_port": 8181, "backend_sampling": True}
    data = _evaluate(settings)
    argv = _launch_argv(data)
    app = typer.Typer()
    launch.register(app)
    known = {opt for param in typer.main.get_command(app).params for opt in param.opts}
    flags = {a for a in argv if a.startswith("--")}
    assert flags <= known, flags - known
    plan = _dry_run(argv, tmp_path / "status.json")
    assert plan["backend"] == "llama-server" and plan["card"] == "tesla-p4"
    for key in ("n_ctx", "n_parallel", "n_batch", "n_ubatch", "kv_type", "flash_attn", "kv_unified",
                "n_gpu_layers", "backend_sampling", "shutdown_grace_s"):
        assert plan[key] == settings[key], key
    # A fully offloaded llama-server plan leaves threads to llama.cpp; the flag still reaches the launcher.
    assert argv[argv.index("--n-threads") + 1] == "2"
    unit = _unit(data)
    assert unit["serviceConfig"]["TimeoutStopSec"] == "60s"  # the gateway's 45 s drain + 15 s
    assert argv[argv.index("--shutdown-grace-s") + 1] == "45"
    assert unit["path"] == [{"package": "llama-cpp", "overriddenWith": {"cudaSupport": True}}]
    assert data["config"]["environment"]["systemPackages"] == unit["path"]


@needs_nix
def test_the_default_unit_plans_on_the_cpu_too(tmp_path: Path) -> None:
    data = _evaluate({"enable": True, "card": "cpu", "nvidiaPersistenced": False,
                      "llamaCpp": {"enable": False}})
    unit = _unit(data)
    assert unit["after"] == ["network.target"] and unit["path"] == []
    assert unit["serviceConfig"]["TimeoutStopSec"] == "45s"
    plan = _dry_run(_launch_argv(data), tmp_path / "status.json")
    assert plan["backend"] == "embedded" and plan["gpus"] == 0


@needs_nix
def test_a_models_file_runs_serve_with_it(tmp_path: Path) -> None:
    from server.cli.serve import settings_from_argv

    data = _evaluate({"enable": True, "models_file": "/var/lib/edgeserve/models.yaml", "port": 8100,
                      "shutdown_grace_s": 20})
    program, command, *argv = shlex.split(_unit(data)["serviceConfig"]["ExecStart"])
    assert program.endswith("/bin/edgeserve") and command == "serve"
    settings = settings_from_argv(argv)
    assert str(settings.models_file) == "/var/lib/edgeserve/models.yaml"
    assert settings.port == 8100 and settings.shutdown_grace_s == 20


@needs_nix
def test_prometheus_scrapes_the_gateway_and_grafana_shows_the_dashboard() -> None:
    data = _evaluate({"enable": True, "host": "0.0.0.0", "port": 8100, "openFirewall": True,
                      "prometheus": {"enable": True}, "grafana": {"enable": True}})
    services = data["config"]["services"]
    (scrape,) = services["prometheus"]["scrapeConfigs"]
    assert scrape["job_name"] == "edgeserve"
    assert scrape["static_configs"] == [{"targets": ["127.0.0.1:8100"]}]
    (rules,) = services["prometheus"]["ruleFiles"]
    assert Path(rules) == ROOT / "monitoring" / "prometheus" / "edgeserve_rules.yml"
    (provider,) = services["grafana"]["provision"]["dashboards"]["settings"]["providers"]
    assert (Path(provider["options"]["path"]) / "edgeserve.json").is_file()
    (source,) = services["grafana"]["provision"]["datasources"]["settings"]["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://127.0.0.1:9090"
    assert data["config"]["networking"]["firewall"]["allowedTCPPorts"] == [8100]
    assert all(a["assertion"] for a in data["config"]["assertions"])


@needs_nix
def test_wrong_values_are_rejected() -> None:
    with pytest.raises(RuntimeError, match="is not a null or positive integer"):
        _evaluate({"enable": True, "n_ctx": -1})
    with pytest.raises(RuntimeError, match=r"no such option: services\.edgeserve\.ctx_size"):
        _evaluate({"enable": True, "ctx_size": 4096})
    with pytest.raises(RuntimeError, match="is not a enum"):
        _evaluate({"enable": True, "backend": "vllm"})
    relative = _evaluate({"enable": True, "model": "models/x.gguf"})["config"]["assertions"]
    assert [a["message"] for a in relative if not a["assertion"]] == [
        "services.edgeserve.model must be an absolute path"]
    grafana_alone = _evaluate({"enable": True, "grafana": {"enable": True}})["config"]["assertions"]
    assert any(not a["assertion"] and "needs a Prometheus" in a["message"] for a in grafana_alone)


@needs_nix
def test_the_example_configuration_evaluates_with_the_module() -> None:
    data = _evaluate(example=True)
    settings = data["settings"]
    assert settings["enable"] is True
    assert settings["card"] in card_ids() and settings["backend"] in backend_choices()
    # A Tesla P4 cannot run SGLang (CC 6.1), and its llama.cpp must be built with CUDA 12.x.
    assert not (settings["card"] == "tesla-p4" and settings["backend"] == "sglang")
    package = settings["llamaCpp"]["package"]
    assert package["overriddenWith"]["cudaSupport"] is True
    assert package["overriddenWith"]["cudaPackages"]["version"].startswith("12.")
    assert settings["prometheus"]["enable"] and settings["grafana"]["enable"]
    argv = _launch_argv(data)
    assert argv[argv.index("--model-path") + 1].endswith(".gguf")
    text = (ROOT / "phase0_nixos" / "example_configuration.nix").read_text()
    assert "nvidiaPersistenced = true" in text
    assert "/phase0_nixos/edgeserve.nix" in text  # from the checkout: the module reads ../monitoring/
