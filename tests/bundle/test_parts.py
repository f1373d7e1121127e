"""A bundle in parts for transport and back: every part and then every file is checked on the way in."""

from __future__ import annotations

import filecmp
import hashlib
import io
import json
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from server.bundle.manifest import MANIFEST_NAME, read_manifest
from server.bundle.parts import ARCHIVE_NAME, INDEX_NAME, join, read_index, split
from server.bundle.problems import BadArchive, BadPart, BundleError, MissingPart, NoPartsIndex, WrongHash

PART = tarfile.RECORDSIZE  # 10 KiB, the smallest part: the made-up bundle (about 30 KiB) takes three


def _problems(parts: Path, folder: Path) -> list[object]:
    with pytest.raises(BundleError) as caught:
        join(parts, folder)
    return list(caught.value.problems)


def test_split_then_join_gives_the_same_files(fake_bundle: Callable[..., Path], tmp_path: Path) -> None:
    folder = fake_bundle()
    index = split(folder, tmp_path / "parts", PART)
    assert len(index.parts) >= 2
    assert all(p.size == PART for p in index.parts[:-1]) and 0 < index.parts[-1].size <= PART
    assert sum(p.size for p in index.parts) == index.archive_bytes
    assert read_index(tmp_path / "parts") == index
    manifest = join(tmp_path / "parts", tmp_path / "again")
    assert manifest == read_manifest(folder)
    names = [MANIFEST_NAME, *(p.name for p in manifest.pieces)]
    _, mismatch, errors = filecmp.cmpfiles(folder, tmp_path / "again", names, shallow=False)
    assert not mismatch and not errors


def test_the_parts_are_a_plain_tar_stream(fake_bundle: Callable[..., Path], tmp_path: Path) -> None:
    """On a machine without Python's help: cat the parts into tar."""
    folder = fake_bundle()
    split(folder, tmp_path / "parts", PART)
    (tmp_path / "by-hand").mkdir()
    parts = sorted((tmp_path / "parts").glob(f"{ARCHIVE_NAME}.*"))
    stream = b"".join(p.read_bytes() for p in parts)
    subprocess.run(["tar", "x", "-C", str(tmp_path / "by-hand")], input=stream, check=True)
    assert filecmp.cmp(folder / MANIFEST_NAME, tmp_path / "by-hand" / MANIFEST_NAME, shallow=False)


def test_a_damaged_or_missing_part_is_named(fake_bundle: Callable[..., Path], tmp_path: Path) -> None:
    index = split(fake_bundle(), tmp_path / "parts", PART)
    first, second = (tmp_path / "parts" / p.name for p in index.parts[:2])
    data = bytearray(first.read_bytes())
    data[-1] ^= 0x01
    first.write_bytes(bytes(data))
    second.unlink()
    found = _problems(tmp_path / "parts", tmp_path / "out")
    assert found == [BadPart(first.name, found[0].what), MissingPart(second.name)]  # type: ignore[attr-defined]
    assert "sha256" in found[0].message() and "copy it again" in found[0].message()
    assert not (tmp_path / "out").exists()  # nothing unpacked from bad parts


def test_a_short_part_is_named_by_its_size(fake_bundle: Callable[..., Path], tmp_path: Path) -> None:
    index = split(fake_bundle(), tmp_path / "parts", PART)
    part = tmp_path / "parts" / index.parts[0].name
    part.write_bytes(part.read_bytes()[:1000])
    [problem] = _problems(tmp_path / "parts", tmp_path / "out")
    assert "1000 bytes" in problem.message()  # type: ignore[attr-defined]


def _one_part(parts: Path, data: bytes) -> Path:
    """A parts folder holding `data` as its one part, with a true index."""
    parts.mkdir()
    digest = hashlib.sha256(data).hexdigest()
    (parts / f"{ARCHIVE_NAME}.000").write_bytes(data)
    (parts / INDEX_NAME).write_text(json.dumps({
        "format": 1, "part_bytes": 1 << 20, "archive_bytes": len(data), "archive_sha256": digest,
        "parts": [{"name": f"{ARCHIVE_NAME}.000", "size": len(data), "sha256": digest}]}))
    return parts


def test_join_checks_every_file_against_the_manifest(fake_bundle: Callable[..., Path],
                                                     tmp_path: Path) -> None:
    """Parts that agree with their index (made again after a file changed): the file check catches it."""
    folder = fake_bundle()
    wheel = next(folder.glob("numpy-*.whl"))
    index = split(folder, tmp_path / "parts", PART)
    raw = b"".join((tmp_path / "parts" / p.name).read_bytes() for p in index.parts)
    changed = raw.replace(wheel.read_bytes()[:64], b"\x00" * 64, 1)
    assert changed != raw
    found = _problems(_one_part(tmp_path / "changed", changed), tmp_path / "out")
    assert [type(p) for p in found] == [WrongHash] and wheel.name in found[0].message()  # type: ignore[attr-defined]


def test_nothing_lands_outside_the_bundle_folder(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo("../escaped.whl")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"bad"))
    found = _problems(_one_part(tmp_path / "parts", buffer.getvalue()), tmp_path / "bundle")
    assert [type(p) for p in found] == [BadArchive] and "../escaped.whl" in found[0].message()  # type: ignore[attr-defined]
    assert not (tmp_path / "escaped.whl").exists()


def test_a_folder_without_an_index_holds_no_parts(tmp_path: Path) -> None:
    assert _problems(tmp_path, tmp_path / "out") == [NoPartsIndex(str(tmp_path), INDEX_NAME)]


def test_a_broken_bundle_is_not_split(fake_bundle: Callable[..., Path], tmp_path: Path) -> None:
    folder = fake_bundle()
    next(folder.glob("*.whl")).unlink()
    with pytest.raises(BundleError):
        split(folder, tmp_path / "parts", PART)
    assert not (tmp_path / "parts").exists()


def test_a_part_smaller_than_a_tar_record_is_refused(fake_bundle: Callable[..., Path],
                                                     tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="too small"):
        split(fake_bundle(), tmp_path / "parts", 100)
