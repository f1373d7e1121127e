"""Check a bundle before anything is installed from it: every file's size and sha256, the pins, the target.

Every file against the manifest, the pins setup needs, and the target against the Python and the machine that
will install it.

Standard library only (see the package's docstring).
"""

from __future__ import annotations

import platform
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from quantize.atomic import sha256_file
from server.bundle.manifest import MANIFEST_NAME, PURPOSES, Manifest, Role, Target, read_manifest
from server.bundle.problems import (
    BadManifest,
    BundleError,
    MissingPiece,
    MissingRequirement,
    NoManifest,
    NoTestPieces,
    Problem,
    UnlistedFile,
    WrongHash,
    WrongPlatform,
    WrongPython,
    WrongSize,
)

# Files pip's --find-links would take as packages: any of them not in the manifest would go in unchecked.
PACKAGE_SUFFIXES = (".whl", ".tar.gz", ".zip", ".tar.bz2", ".tgz")
# The legacy manylinux names and the glibc they stand for (PEP 600).
LEGACY_MANYLINUX = {"manylinux1": (2, 5), "manylinux2010": (2, 12), "manylinux2014": (2, 17)}
_MANYLINUX = re.compile(r"^manylinux_(\d+)_(\d+)_(.+)$")


@dataclass(frozen=True)
class Requirement:
    """A pin that must be in the bundle, with the role that says what it is for."""

    project: str
    version: str
    role: Role

    @classmethod
    def parse(cls, pin: str, role: Role) -> Requirement:
        name, sep, version = pin.partition("==")
        if not sep or not name.strip() or not version.strip():
            raise ValueError(f"{pin!r}: a required piece is given as project==version")
        return cls(project=name.strip(), version=version.strip(), role=role)


@dataclass(frozen=True)
class Host:
    """The Python and machine that are to install the bundle."""

    python_version: str  # major.minor
    machine: str  # platform.machine(): x86_64, aarch64, ...
    glibc: tuple[int, int] | None  # None: another C library (musl) or not Linux

    @classmethod
    def this_machine(cls) -> Host:
        libc, version = platform.libc_ver()
        glibc = None
        if libc == "glibc" and (m := re.match(r"^(\d+)\.(\d+)", version)):
            glibc = (int(m.group(1)), int(m.group(2)))
        return cls(python_version=f"{sys.version_info.major}.{sys.version_info.minor}",
                   machine=platform.machine(), glibc=glibc)

    def describe(self) -> str:
        libc = f"glibc {self.glibc[0]}.{self.glibc[1]}" if self.glibc else "no glibc"
        return f"{self.machine}, {libc}"


def runs_on(platform_tag: str, host: Host) -> bool | None:
    """Can `host` run wheels of this platform tag? None where the tag is not a manylinux one (not judged)."""
    arch = platform_tag.partition("_")[2]
    legacy = LEGACY_MANYLINUX.get(platform_tag.partition("_")[0])
    m = _MANYLINUX.match(platform_tag)
    if m:
        needs, arch = (int(m.group(1)), int(m.group(2))), m.group(3)
    elif legacy:
        needs = legacy
    else:
        return None
    return host.glibc is not None and arch == host.machine and host.glibc >= needs


def check_host(target: Target, host: Host) -> tuple[Problem, ...]:
    problems: list[Problem] = []
    if target.python_version != host.python_version:
        problems.append(WrongPython(target=target, python_version=host.python_version))
    verdicts = [runs_on(tag, host) for tag in target.platforms]
    if all(v is False for v in verdicts):
        problems.append(WrongPlatform(target=target, here=host.describe()))
    return tuple(problems)


def check_needs(manifest: Manifest, requires: tuple[Requirement, ...],
                with_test: bool) -> tuple[Problem, ...]:
    made_by = manifest.maker.version + (f" ({manifest.maker.commit[:12]})" if manifest.maker.commit else "")
    problems: list[Problem] = [
        MissingRequirement(project=r.project, version=r.version, purpose=PURPOSES[r.role], made_by=made_by)
        for r in requires if manifest.find(r.project, r.version) is None
    ]
    if with_test and not (manifest.with_test and manifest.by_role(Role.TEST)):
        problems.append(NoTestPieces())
    return tuple(problems)


def check_files(folder: Path, manifest: Manifest) -> tuple[Problem, ...]:
    """Every piece present with its size and sha256 (the hash is read only where the size is right), and no
    package file beside them that the manifest does not list."""
    problems: list[Problem] = []
    for piece in manifest.pieces:
        path = folder / piece.name
        if not path.is_file():
            problems.append(MissingPiece(piece))
        elif (size := path.stat().st_size) != piece.size:
            problems.append(WrongSize(piece, size))
        elif (digest := sha256_file(path)) != piece.sha256:
            problems.append(WrongHash(piece, digest))
    listed = {p.name for p in manifest.pieces} | {MANIFEST_NAME}
    problems.extend(UnlistedFile(path.name) for path in sorted(folder.iterdir())
                    if path.name not in listed and path.name.endswith(PACKAGE_SUFFIXES))
    return tuple(problems)


def load(folder: Path) -> Manifest:
    """The folder's manifest; BundleError where there is none or it cannot be read."""
    try:
        return read_manifest(folder)
    except FileNotFoundError:
        raise BundleError((NoManifest(str(folder)),)) from None
    except ValueError as exc:
        raise BundleError((BadManifest(str(exc)),)) from None


def verify(folder: Path, requires: tuple[Requirement, ...] = (), with_test: bool = False,
           host: Host | None = None) -> Manifest:
    """The folder's manifest once every check passes; else BundleError listing every problem found.

    `host` None skips the target check (a bundle checked on the machine that made it for another)."""
    manifest = load(folder)
    problems = check_needs(manifest, requires, with_test)
    if host is not None:
        problems += check_host(manifest.target, host)
    problems += check_files(folder, manifest)
    if problems:
        raise BundleError(problems)
    return manifest
