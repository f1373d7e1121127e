"""Fixtures of the launcher tests: fixed toolchains, plans for a named card (nothing detected, nothing
started), SGLang's own argument parser. Every launcher test runs without EDGESERVE_* variables."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from functools import cache

import pytest

from quantize.model.units import GIB
from server.hardware.cards import GpuSet, get_card
from server.hardware.target import CpuTarget
from server.launch.plan import LaunchPlan
from server.launch.planner import make_plan
from server.launch.request import LaunchRequest
from server.launch.toolchain import Toolchain

HOST_RAM = 64 * GIB
# A machine with everything installed (plans only: nothing here is started).
FULL = Toolchain(
    python="python3",
    has_sglang=True,
    llama_server="/opt/llama/bin/llama-server",
    edgeserve=("edgeserve",),
    cpu_threads=8,
    engine_gpu_offload=True,
)
# A machine with neither SGLang nor llama-server.
BARE = Toolchain(
    python="python3", has_sglang=False, llama_server=None, edgeserve=("edgeserve",), cpu_threads=8
)


@pytest.fixture(autouse=True)
def _no_edgeserve_env(clean_env: None) -> None:
    """Profiles read EDGESERVE_*: the caller's shell must not decide these plans."""


@pytest.fixture(scope="session")
def full_toolchain() -> Toolchain:
    return FULL


@pytest.fixture(scope="session")
def bare_toolchain() -> Toolchain:
    return BARE


def _plan_for(
    card: str,
    backend: str = "auto",
    gpus: int | None = None,
    toolchain: Toolchain = FULL,
    profiles_dir: object = None,
    **flags: object,
) -> LaunchPlan:
    target = CpuTarget(ram_bytes=HOST_RAM) if card == "cpu" else GpuSet.of(get_card(card), gpus or 1)
    request = LaunchRequest(backend=backend, card=card, gpus=gpus, **flags)  # type: ignore[arg-type]
    return make_plan(request, toolchain=toolchain, target=target, profiles_dir=profiles_dir)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def plan_for() -> Callable[..., LaunchPlan]:
    """plan_for(card, backend="auto", gpus=None, toolchain=FULL, profiles_dir=None, **flags): the plan
    `edgeserve launch --card CARD ...` makes, without detecting anything (64 GiB of host RAM)."""
    return _plan_for


@cache
def _sglang_parser() -> argparse.ArgumentParser:
    from sglang.srt.server_args import ServerArgs

    parser = argparse.ArgumentParser(prog="sglang.launch_server", exit_on_error=False)
    ServerArgs.add_cli_args(parser)
    return parser


@pytest.fixture(scope="session")
def sglang_parser() -> argparse.ArgumentParser:
    """SGLang 0.5.23's own argument parser (skips where sglang does not import)."""
    pytest.importorskip("sglang.srt.server_args")
    return _sglang_parser()


@pytest.fixture(scope="session")
def sglang_parse(sglang_parser: argparse.ArgumentParser) -> Callable[[LaunchPlan], argparse.Namespace]:
    """Parse a plan's argv (after `python -m sglang.launch_server`) with SGLang's own parser."""

    def parse(plan: LaunchPlan) -> argparse.Namespace:
        assert plan.argv[1:3] == ("-m", "sglang.launch_server"), plan.argv[:3]
        return sglang_parser.parse_args(list(plan.argv[3:]))

    return parse
