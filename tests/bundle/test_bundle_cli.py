"""`edgeserve bundle`: `bundle DIR` makes one; split, join, verify; each failure's exit status and message."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from typer.testing import CliRunner

from server.cli.app import app


def test_bundle_dir_is_make_dir(tmp_path: Path) -> None:
    """A first word that names no subcommand is the folder to make (refused here before any download)."""
    (tmp_path / "kept.txt").write_text("x")
    result = CliRunner().invoke(app, ["bundle", str(tmp_path), "--python-version", "3.12"])
    assert result.exit_code == 1
    assert "is not empty" in result.output


def test_a_bad_target_is_a_usage_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["bundle", str(tmp_path / "new"), "--python-version", "3"])
    assert result.exit_code == 2 and "give major.minor" in result.output


def test_split_join_verify(fake_bundle: Callable[..., Path], tmp_path: Path) -> None:
    folder = fake_bundle()
    runner = CliRunner()
    result = runner.invoke(app, ["bundle", "split", str(folder), "--out", str(tmp_path / "parts"),
                                 "--size-mib", "1"])
    assert result.exit_code == 0, result.output
    assert "1 parts of at most 1 MiB" in result.output
    result = runner.invoke(app, ["bundle", "join", str(tmp_path / "parts"), str(tmp_path / "again")])
    assert result.exit_code == 0, result.output
    assert "runtime" in result.output and "total" in result.output
    sdist = tmp_path / "again" / "llama_cpp_python-0.3.36.tar.gz"
    sdist.write_bytes(b"short")
    result = runner.invoke(app, ["bundle", "verify", str(tmp_path / "again")])
    assert result.exit_code == 1
    assert sdist.name in result.output and "llama-cpp-python's source" in result.output


def test_the_commands_are_listed() -> None:
    result = CliRunner().invoke(app, ["bundle", "--help"])
    assert result.exit_code == 0
    assert all(word in result.output for word in ("make", "split", "join", "verify"))
