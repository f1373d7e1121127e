"""What can be wrong with a bundle or its parts, one typed value per kind; the message is rendered from it.

Standard library only (see the package's docstring).
"""

from __future__ import annotations

from dataclasses import dataclass

from server.bundle.manifest import MANIFEST_NAME, Piece, Target


@dataclass(frozen=True)
class NoManifest:
    folder: str

    def message(self) -> str:
        return (f"{self.folder} has no {MANIFEST_NAME}: it is not a bundle (make one with `edgeserve bundle "
                f"DIR` on a connected machine, or join its parts first)")


@dataclass(frozen=True)
class BadManifest:
    reason: str

    def message(self) -> str:
        return f"the manifest cannot be read: {self.reason}"


@dataclass(frozen=True)
class MissingPiece:
    piece: Piece

    def message(self) -> str:
        return f"{self.piece.describe()} is missing"


@dataclass(frozen=True)
class WrongSize:
    piece: Piece
    size: int

    def message(self) -> str:
        return (f"{self.piece.describe()} has {self.size} bytes where the manifest says {self.piece.size}: "
                f"copy it again")


@dataclass(frozen=True)
class WrongHash:
    piece: Piece
    sha256: str

    def message(self) -> str:
        return (f"{self.piece.describe()} is corrupt: sha256 {self.sha256}, the manifest says "
                f"{self.piece.sha256}: copy it again")


@dataclass(frozen=True)
class UnlistedFile:
    name: str

    def message(self) -> str:
        return (f"{self.name} is in the bundle folder but not in its manifest: pip would install it "
                f"unchecked; remove it")


@dataclass(frozen=True)
class MissingRequirement:
    """A pin setup installs (llama-cpp-python, the bundled model) that the bundle does not hold."""

    project: str
    version: str
    purpose: str
    made_by: str  # the edgeserve that made the bundle

    def message(self) -> str:
        return (f"the bundle has no {self.project} {self.version} ({self.purpose}); it was made by edgeserve "
                f"{self.made_by}: make it again from this checkout")


@dataclass(frozen=True)
class NoTestPieces:
    def message(self) -> str:
        return "the bundle has no test dependencies, which run_tests.sh installs: make it with --with-test"


@dataclass(frozen=True)
class WrongPython:
    target: Target
    python_version: str  # the Python that is to install it

    def message(self) -> str:
        wanted = self.target.python_version
        return (f"the bundle's wheels are for Python {wanted}; this is Python {self.python_version}: run "
                f"setup with that Python (PYTHON=python{wanted}) or make the bundle with --python-version "
                f"{self.python_version}")


@dataclass(frozen=True)
class WrongPlatform:
    target: Target
    here: str  # this machine's architecture and C library, e.g. "x86_64, glibc 2.17"

    def message(self) -> str:
        return (f"the bundle's wheels are for {', '.join(self.target.platforms)}, which this machine "
                f"({self.here}) cannot run: make the bundle with --platform for this machine "
                f"(manylinux_2_<glibc minor>_<arch>)")


@dataclass(frozen=True)
class NoPartsIndex:
    folder: str
    index: str

    def message(self) -> str:
        return f"{self.folder} has no {self.index}: it does not hold a bundle's parts"


@dataclass(frozen=True)
class MissingPart:
    name: str

    def message(self) -> str:
        return f"part {self.name} is missing: copy it over too"


@dataclass(frozen=True)
class BadPart:
    name: str
    what: str  # what differs, e.g. "47185920 bytes where the index says 52428800"

    def message(self) -> str:
        return f"part {self.name} is damaged ({self.what}): copy it again"


@dataclass(frozen=True)
class BadArchive:
    reason: str

    def message(self) -> str:
        return f"the joined parts are not a bundle archive: {self.reason}"


Problem = (NoManifest | BadManifest | MissingPiece | WrongSize | WrongHash | UnlistedFile | MissingRequirement
           | NoTestPieces | WrongPython | WrongPlatform | NoPartsIndex | MissingPart | BadPart | BadArchive)


class BundleError(Exception):
    """A bundle (or its parts) that must not be used; every problem found, one per line."""

    def __init__(self, problems: tuple[Problem, ...]) -> None:
        self.problems = problems
        super().__init__("\n".join(p.message() for p in problems))
