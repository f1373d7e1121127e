"""The profiles of the cards people run small (issue 11): each plans a Llama-3.1-8B Q4_K_M at its own n_ctx x
n_parallel without stepping anything down, on the backend its comments give, within its memory budget."""

from __future__ import annotations

import json
from collections.abc import Callable
from importlib import resources

import pytest
import yaml

from quantize.model.hf_config import model_spec_from_hf_config
from quantize.model.spec import ModelSpec
from quantize.model.tensor_types import spec_at_level
from server.hardware.cards import GpuSet, get_card
from server.launch.context import BuildContext
from server.launch.plan import LaunchPlan
from server.launch.profile import default_profiles_dir, load_profile, profile_file_name
from server.launch.registry import build_plan
from server.launch.request import LaunchRequest
from server.launch.toolchain import Toolchain

MODEL = "/models/Llama-3.1-8B-Instruct-Q4_K_M.gguf"
# llama.cpp only: where SGLang is not installed `auto` falls back to llama-server.
NO_SGLANG = Toolchain(python="python3", has_sglang=False, llama_server="/opt/llama/bin/llama-server")

# card id -> (backend its profile plans with SGLang installed, KV type of that plan)
EXPECTED = {
    "tesla-p40": ("llama-server", "q8_0"),
    "tesla-p100-16gb": ("llama-server", "q8_0"),
    "tesla-v100-16gb": ("llama-server", "q8_0"),
    "tesla-v100-32gb": ("llama-server", "q8_0"),
    "rtx-3060-12gb": ("llama-server", "q8_0"),
    "rtx-a4000": ("llama-server", "q8_0"),
    "rtx-a5000": ("sglang", "auto"),  # no FP8 on sm_86: SGLang keeps the model's 16-bit dtype
    "rtx-4060-ti-16gb": ("llama-server", "q8_0"),
    "rtx-5060-ti-16gb": ("llama-server", "q8_0"),
    "rtx-5080": ("llama-server", "q8_0"),
    "l40s": ("sglang", "fp8_e4m3"),
}


@pytest.fixture(scope="module")
def llama8b_q4km(tmp_path_factory: pytest.TempPathFactory, llama31_8b_config: dict[str, object]) -> ModelSpec:
    """Llama-3.1-8B's shapes (its config.json) at Q4_K_M: 4.58 GiB of weights, as llama-quantize makes it."""
    cfg = tmp_path_factory.mktemp("l8b") / "config.json"
    cfg.write_text(json.dumps(llama31_8b_config))
    return spec_at_level(model_spec_from_hf_config(cfg), "Q4_K_M")


@pytest.fixture(scope="module")
def plan_8b(llama8b_q4km: ModelSpec, full_toolchain: Toolchain) -> Callable[..., LaunchPlan]:
    """plan_8b(card, backend="auto", toolchain=everything installed): `edgeserve launch --card CARD` for an
    8B Q4_K_M GGUF, as plan_for makes it but with the model's shapes given rather than read from a file."""

    def plan(card: str, backend: str = "auto", toolchain: Toolchain | None = None) -> LaunchPlan:
        request = LaunchRequest(backend=backend, card=card, model_path=MODEL)
        ctx = BuildContext(
            target=GpuSet.of(get_card(card)),
            spec=llama8b_q4km,
            model_path=MODEL,
            profile=load_profile(card),
            request=request,
            toolchain=toolchain or full_toolchain,
        )
        return build_plan(ctx)

    return plan


def test_every_small_card_has_an_expectation() -> None:
    text = resources.files("server.hardware").joinpath("cards_small.yaml").read_text(encoding="utf-8")
    assert set(EXPECTED) == {row["id"] for row in yaml.safe_load(text)["cards"]}


@pytest.mark.parametrize("card", sorted(EXPECTED))
def test_profile_plans_an_8b_q4km_at_its_own_settings(card: str, plan_8b: Callable[..., LaunchPlan]) -> None:
    profile = load_profile(card).profile
    backend, kv_type = EXPECTED[card]
    plan = plan_8b(card)
    assert (plan.backend, plan.kv_type) == (backend, kv_type)
    # nothing stepped down: the profile's pool is what runs
    assert (plan.n_ctx, plan.n_parallel) == (profile.n_ctx, profile.n_parallel)
    assert not [r for r in plan.reasons if r.setting in ("n_ctx", "n_parallel") and r.source == "derived"]
    assert plan.memory is not None and plan.memory.fits
    assert plan.memory.capacity_bytes is not None
    assert plan.memory.total_bytes <= plan.memory.capacity_bytes
    if backend == "llama-server":
        assert plan.flash_attn == "on"  # the q8_0 V cache needs it; llama.cpp's kernels run from Pascal on


@pytest.mark.parametrize("card", sorted(EXPECTED))
def test_without_sglang_every_small_card_still_fits_on_llama_cpp(
    card: str, plan_8b: Callable[..., LaunchPlan]
) -> None:
    profile = load_profile(card).profile
    plan = plan_8b(card, toolchain=NO_SGLANG)
    assert plan.backend == "llama-server" and plan.kv_type == "q8_0"
    assert (plan.n_ctx, plan.n_parallel) == (profile.n_ctx, profile.n_parallel)
    assert plan.memory is not None and plan.memory.fits


@pytest.mark.parametrize("card", ["tesla-p40", "tesla-p100-16gb", "tesla-v100-16gb", "tesla-v100-32gb"])
def test_pascal_and_volta_prefer_llama_server_because_sglang_cannot_run(card: str) -> None:
    profile = load_profile(card).profile
    assert profile.preferred_backend == "llama-server"
    assert not get_card(card).can_run_sglang


@pytest.mark.parametrize("card", ["rtx-4060-ti-16gb", "rtx-5060-ti-16gb", "rtx-5080"])
def test_forced_sglang_keeps_an_fp8_cache_on_fp8_cards(card: str, plan_8b: Callable[..., LaunchPlan]) -> None:
    plan = plan_8b(card, backend="sglang")
    assert plan.backend == "sglang" and plan.kv_type == "fp8_e4m3"
    assert plan.memory is not None and plan.memory.fits


def test_sglang_would_not_hold_the_3060_profile(plan_8b: Callable[..., LaunchPlan]) -> None:
    """Why the 3060 prefers llama-server: SGLang's fixed costs leave too small a pool on 12 GB."""
    plan = plan_8b("rtx-3060-12gb", backend="sglang")
    profile = load_profile("rtx-3060-12gb").profile
    assert plan.n_ctx * plan.n_parallel < profile.n_ctx * profile.n_parallel


def test_profiles_are_files_next_to_the_others() -> None:
    names = {p.name for p in default_profiles_dir().iterdir()}
    assert {profile_file_name(c) for c in EXPECTED} <= names
    assert profile_file_name("rtx-4060-ti-16gb") == "rtx_4060_ti_16gb.yaml"
