"""The NixOS module parses, declares the options operators set, passes only flags `edgeserve launch` has."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import typer
import typer.main
from typer.testing import CliRunner

from server.cli import launch
from server.hardware.cards import card_ids
from server.launch.registry import backend_choices

ROOT = Path(__file__).resolve().parents[2]
MODULE = ROOT / "phase0_nixos" / "edgeserve.nix"
EXAMPLE = ROOT / "phase0_nixos" / "example_configuration.nix"

nix_instantiate = shutil.which("nix-instantiate")


@pytest.mark.skipif(
    nix_instantiate is None,
    reason="nix-instantiate not installed (Debian package `nix-bin`); run_tests.sh installs it as root",
)
@pytest.mark.parametrize("path", [MODULE, EXAMPLE], ids=lambda p: p.name)
def test_nix_files_parse(path: Path) -> None:
    assert nix_instantiate is not None
    proc = subprocess.run([nix_instantiate, "--parse", str(path)], capture_output=True, text=True, timeout=60,
                          check=False)
    assert proc.returncode == 0, proc.stderr


def _option_names(text: str) -> set[str]:
    block = text[text.index("options.services.edgeserve"):text.index("config = mkIf cfg.enable")]
    return set(re.findall(r"^\s{4}(\w+) = mk(?:Option|EnableOption)\b", block, flags=re.MULTILINE))


def test_module_declares_the_service_options() -> None:
    names = _option_names(MODULE.read_text())
    assert {"enable", "package", "venv", "model", "host", "port", "backend", "card", "n_ctx", "n_parallel",
            "extraArgs", "openFirewall", "environment", "environmentFile", "nvidiaPersistenced"} <= names


def test_module_backend_choices_match_the_launcher() -> None:
    text = MODULE.read_text()
    enum = re.search(r"types\.enum \[([^\]]*)\]", text)
    assert enum is not None
    assert set(re.findall(r'"([^"]+)"', enum.group(1))) == set(backend_choices())


def _launch_flags(text: str) -> list[str]:
    block = text[text.index("launchArgs ="):text.index("\nin\n")]
    return re.findall(r'"(--[a-z][a-z-]*)"', block)


def _launch_app() -> typer.Typer:
    app = typer.Typer()
    launch.register(app)
    return app


def test_module_passes_only_flags_edgeserve_launch_has() -> None:
    flags = _launch_flags(MODULE.read_text())
    wanted = {"--backend", "--card", "--host", "--port", "--model-path", "--n-ctx", "--n-parallel"}
    assert wanted <= set(flags)
    command = typer.main.get_command(_launch_app())
    known = {opt for param in command.params for opt in param.opts}
    assert set(flags) <= known, set(flags) - known


def test_the_service_command_line_is_accepted_by_launch(tmp_path: Path) -> None:
    """The argv the module builds, with CPU values, goes through `edgeserve launch --dry-run`."""
    values = {"--backend": "embedded", "--card": "cpu", "--host": "127.0.0.1", "--port": "8000",
              "--status-file": str(tmp_path / "status.json"), "--n-ctx": "2048", "--n-parallel": "2"}
    args: list[str] = []
    for flag in _launch_flags(MODULE.read_text()):
        if flag in values:
            args += [flag, values[flag]]
    result = CliRunner().invoke(_launch_app(), [*args, "--dry-run", "--json"])
    assert result.exit_code == 0, result.output


def test_example_configuration_uses_the_module_with_known_values() -> None:
    text = EXAMPLE.read_text()
    assert "./edgeserve.nix" in text
    assert re.search(r"services\.edgeserve = \{\s*enable = true;", text)
    card = re.search(r'card = "([^"]+)";', text)
    backend = re.search(r'backend = "([^"]+)";', text)
    assert card is not None and card.group(1) in card_ids()
    assert backend is not None and backend.group(1) in backend_choices()
    # A Tesla P4 cannot run SGLang (compute capability 6.1): the example must not ask for it.
    assert not (card.group(1) == "tesla-p4" and backend.group(1) == "sglang")
    assert "nvidiaPersistenced = true" in text
