"""A bundle in parts of a chosen size for transport, and back: joining checks every part, then every file.

One tar stream cut into numbered files, with an index of their sizes and sha256. Being a plain tar stream,
`cat edgeserve-bundle.tar.* | tar x -C DIR` also joins them (without the checks; setup still checks every file
against the manifest). Standard library only (see the package's docstring).
"""

from __future__ import annotations

import hashlib
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from quantize.atomic import sha256_file
from server.bundle.manifest import MANIFEST_NAME, Manifest
from server.bundle.problems import BadArchive, BadPart, BundleError, MissingPart, NoPartsIndex, Problem
from server.bundle.verify import verify

INDEX_NAME = "parts.json"
ARCHIVE_NAME = "edgeserve-bundle.tar"
FORMAT = 1
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Part:
    name: str
    size: int
    sha256: str


@dataclass(frozen=True)
class PartsIndex:
    parts: tuple[Part, ...]
    part_bytes: int  # the most one part holds
    archive_bytes: int
    archive_sha256: str  # of the parts joined, for a check by hand (`cat ... | sha256sum`)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "join": f"python3 -m server.bundle join PARTS DIR (or: cat {ARCHIVE_NAME}.* | tar x -C DIR)",
            "part_bytes": self.part_bytes,
            "archive_bytes": self.archive_bytes,
            "archive_sha256": self.archive_sha256,
            "parts": [{"name": p.name, "size": p.size, "sha256": p.sha256} for p in self.parts],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PartsIndex:
        if data.get("format") != FORMAT:
            raise ValueError(f"format {data.get('format')!r}; this edgeserve reads format {FORMAT}")
        try:
            parts = tuple(Part(name=p["name"], size=int(p["size"]), sha256=p["sha256"])
                          for p in data["parts"])
            return cls(parts=parts, part_bytes=int(data["part_bytes"]),
                       archive_bytes=int(data["archive_bytes"]), archive_sha256=data["archive_sha256"])
        except (KeyError, TypeError) as exc:
            raise ValueError(f"a field is missing or of the wrong type: {exc}") from None


class _PartWriter:
    """A file-like sink that starts a new part every `part_bytes`, hashing each part and the whole."""

    def __init__(self, out: Path, part_bytes: int) -> None:
        self.out, self.part_bytes = out, part_bytes
        self.parts: list[Part] = []
        self.whole = hashlib.sha256()
        self.total = 0
        self._file: Any = None
        self._hash = hashlib.sha256()
        self._size = 0

    def write(self, data: bytes) -> int:
        view = memoryview(data)
        while view:
            if self._file is None:
                self._file = (self.out / f"{ARCHIVE_NAME}.{len(self.parts):03d}").open("wb")
            room = self.part_bytes - self._size
            chunk = view[:room]
            self._file.write(chunk)
            self._hash.update(chunk)
            self.whole.update(chunk)
            self._size += len(chunk)
            self.total += len(chunk)
            view = view[len(chunk):]
            if self._size == self.part_bytes:
                self._finish_part()
        return len(data)

    def _finish_part(self) -> None:
        self._file.close()
        name = Path(self._file.name).name
        self.parts.append(Part(name=name, size=self._size, sha256=self._hash.hexdigest()))
        self._file, self._hash, self._size = None, hashlib.sha256(), 0

    def close(self) -> None:
        if self._file is not None:
            self._finish_part()


class _Joined:
    """The parts read back as one stream, in order."""

    def __init__(self, paths: list[Path]) -> None:
        self._paths = list(paths)
        self._file: Any = None

    def read(self, size: int = -1) -> bytes:
        out = bytearray()
        while size < 0 or len(out) < size:
            if self._file is None:
                if not self._paths:
                    break
                self._file = self._paths.pop(0).open("rb")
            chunk = self._file.read(_CHUNK if size < 0 else size - len(out))
            if not chunk:
                self._file.close()
                self._file = None
                continue
            out += chunk
        return bytes(out)

    def __enter__(self) -> _Joined:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._file is not None:
            self._file.close()


def split(folder: Path, out: Path, part_bytes: int) -> PartsIndex:
    """Write the bundle in `folder` (checked first) as parts of at most `part_bytes` into `out`, and the
    index (parts.json)."""
    if part_bytes < tarfile.RECORDSIZE:
        raise ValueError(f"a part of {part_bytes} bytes is too small: at least {tarfile.RECORDSIZE}")
    manifest = verify(folder)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob(f"{ARCHIVE_NAME}.*"):
        old.unlink()  # parts of an earlier split would be joined with these
    writer = _PartWriter(out, part_bytes)
    # The manifest first: a join that is cut short still says what was meant to come. (A stream, "w|", only
    # writes: typeshed's file protocol also asks for seek and tell, which the stream never calls.)
    with tarfile.open(fileobj=writer, mode="w|", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
        for name in (MANIFEST_NAME, *(p.name for p in manifest.pieces)):
            tar.add(folder / name, arcname=name, recursive=False)
    writer.close()
    index = PartsIndex(parts=tuple(writer.parts), part_bytes=part_bytes, archive_bytes=writer.total,
                       archive_sha256=writer.whole.hexdigest())
    (out / INDEX_NAME).write_text(json.dumps(index.to_json(), indent=2) + "\n", encoding="utf-8")
    return index


def read_index(parts_dir: Path) -> PartsIndex:
    path = parts_dir / INDEX_NAME
    if not path.is_file():
        raise BundleError((NoPartsIndex(folder=str(parts_dir), index=INDEX_NAME),))
    try:
        return PartsIndex.from_json(json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, AttributeError) as exc:
        raise BundleError((BadArchive(f"{path}: {exc}"),)) from None


def check_parts(parts_dir: Path, index: PartsIndex) -> tuple[Problem, ...]:
    problems: list[Problem] = []
    for part in index.parts:
        path = parts_dir / part.name
        if not path.is_file():
            problems.append(MissingPart(part.name))
        elif (size := path.stat().st_size) != part.size:
            problems.append(BadPart(part.name, f"{size} bytes where the index says {part.size}"))
        elif (digest := sha256_file(path)) != part.sha256:
            problems.append(BadPart(part.name, f"sha256 {digest} where the index says {part.sha256}"))
    return tuple(problems)


def join(parts_dir: Path, folder: Path) -> Manifest:
    """Check every part, unpack them into `folder`, then check every file against the manifest."""
    index = read_index(parts_dir)
    problems = check_parts(parts_dir, index)
    if problems:
        raise BundleError(problems)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        with _Joined([parts_dir / p.name for p in index.parts]) as stream, \
                tarfile.open(fileobj=stream, mode="r|") as tar:  # type: ignore[call-overload]
            for member in tar:
                _extract(tar, member, folder)
    except tarfile.TarError as exc:
        raise BundleError((BadArchive(str(exc)),)) from None
    return verify(folder)


def _extract(tar: tarfile.TarFile, member: tarfile.TarInfo, folder: Path) -> None:
    # Only plain files with plain names: a bundle is one flat folder, and nothing may land outside it.
    if not member.isfile() or Path(member.name).name != member.name or member.name in ("", ".", ".."):
        raise BundleError((BadArchive(f"{member.name!r} is not a plain file of a bundle"),))
    source = tar.extractfile(member)
    assert source is not None  # a regular file always has data
    tmp = folder / f".{member.name}.partial"
    with tmp.open("wb") as sink:
        while chunk := source.read(_CHUNK):
            sink.write(chunk)
    tmp.replace(folder / member.name)
