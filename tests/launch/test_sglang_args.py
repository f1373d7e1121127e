"""Every SGLang argv the launcher can produce is accepted by SGLang 0.5.23's own parser."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.hardware.cards import all_cards
from server.launch.resolve import PlanError

pytest.importorskip(
    "sglang.srt.server_args", reason="SGLang's parser (sglang==0.5.23, test extras) is needed"
)

SGLANG_CARDS = [c.id for c in all_cards() if c.can_run_sglang]
OTHER_CARDS = [c.id for c in all_cards() if not c.can_run_sglang]


def _check_matches(plan, ns) -> None:  # type: ignore[no-untyped-def]
    assert ns.model_path == plan.model_path
    assert ns.mem_fraction_static == pytest.approx(plan.mem_fraction, abs=5e-4)
    assert ns.max_running_requests == plan.n_parallel
    assert ns.context_length == plan.n_ctx
    assert ns.max_total_tokens == plan.n_ctx_total
    assert ns.kv_cache_dtype == plan.kv_type
    assert ns.tp_size == plan.tp_size
    assert ns.dp_size == plan.dp_size
    assert ns.port == plan.port and ns.host == plan.host
    assert ns.enable_metrics is plan.enable_metrics
    assert ns.schedule_policy == plan.schedule_policy
    assert ns.chunked_prefill_size == plan.chunked_prefill_size


def test_there_are_cards_on_both_sides() -> None:
    assert "rtx-5090" in SGLANG_CARDS and "tesla-p4" in OTHER_CARDS


@pytest.mark.parametrize("card", SGLANG_CARDS)
def test_every_sglang_profile_parses_gguf(card: str, plan_for, sglang_parse) -> None:
    plan = plan_for(card, backend="sglang")
    ns = sglang_parse(plan)
    _check_matches(plan, ns)
    assert ns.load_format == "gguf"
    assert plan.expected_total_bytes and plan.expected_total_bytes > 0


@pytest.mark.parametrize("card", SGLANG_CARDS)
def test_every_sglang_profile_parses_hf_checkpoint(card: str, hf_model_dir, plan_for, sglang_parse) -> None:
    plan = plan_for(card, backend="sglang", model_path=str(hf_model_dir()))
    ns = sglang_parse(plan)
    _check_matches(plan, ns)
    assert ns.load_format == "auto"
    assert "--load-format" not in plan.argv


def test_rtx5090_pair_is_tensor_parallel(tmp_path: Path, hf_model_dir, plan_for, sglang_parse) -> None:
    plan = plan_for("rtx-5090", backend="sglang", gpus=2, model_path=str(hf_model_dir()))
    ns = sglang_parse(plan)
    assert ns.tp_size == 2 and plan.tp_size == 2 and plan.gpus == 2
    assert plan.env["CUDA_VISIBLE_DEVICES"] == "0,1"
    _check_matches(plan, ns)


def test_auto_picks_sglang_on_a_5090(plan_for, sglang_parse) -> None:
    plan = plan_for("rtx-5090")
    assert plan.backend == "sglang"
    assert plan.reasons[0].setting == "backend" and plan.reasons[0].source == "derived"
    sglang_parse(plan)


def test_optional_flags_parse(monkeypatch: pytest.MonkeyPatch, plan_for, sglang_parse) -> None:
    monkeypatch.setenv("EDGESERVE_ENFORCE_EAGER", "true")
    monkeypatch.setenv("EDGESERVE_PREFIX_CACHE", "false")
    monkeypatch.setenv("EDGESERVE_ENABLE_CHUNKED_PREFILL", "false")
    monkeypatch.setenv("EDGESERVE_SCHEDULE_POLICY", "lpm")
    plan = plan_for(
        "rtx-4090", backend="sglang", kv_type="fp8_e4m3", api_key="sk-test", mem_fraction=0.8, port=31000
    )
    ns = sglang_parse(plan)
    assert ns.disable_cuda_graph and ns.disable_radix_cache
    assert ns.chunked_prefill_size == -1
    assert ns.schedule_policy == "lpm"
    assert ns.kv_cache_dtype == "fp8_e4m3"
    assert ns.api_key == "sk-test"
    assert ns.mem_fraction_static == pytest.approx(0.8)
    assert ns.port == 31000


def test_fp8_kv_needs_an_fp8_card(plan_for) -> None:
    with pytest.raises(PlanError, match="FP8"):
        plan_for("rtx-3090", backend="sglang", kv_type="fp8_e4m3")


def test_profile_q8_kv_becomes_fp8_where_the_card_has_it(
    monkeypatch: pytest.MonkeyPatch, plan_for, sglang_parse
) -> None:
    monkeypatch.setenv("EDGESERVE_KV_TYPE", "q8_0")
    plan = plan_for("h100-80gb", backend="sglang")
    assert plan.kv_type == "fp8_e4m3"
    reason = plan.reason("kv_type")
    assert reason is not None and reason.source == "derived"
    sglang_parse(plan)


@pytest.mark.parametrize("card", OTHER_CARDS)
def test_sglang_refused_below_its_floor(card: str, plan_for) -> None:
    with pytest.raises(PlanError, match=r"use llama\.cpp instead"):
        plan_for(card, backend="sglang")


def test_p4_auto_picks_llama_cpp(
    monkeypatch: pytest.MonkeyPatch, bare_toolchain, full_toolchain, plan_for
) -> None:
    assert plan_for("tesla-p4").backend == "llama-server"  # the P4 profile prefers it
    monkeypatch.setenv("EDGESERVE_PREFERRED_BACKEND", "auto")  # the auto rule alone
    plan = plan_for("tesla-p4", toolchain=full_toolchain)
    assert plan.backend == "embedded"  # llama.cpp, in the engine that measured faster than llama-server
    assert "cannot run SGLang" in plan.reasons[0].why and plan.reasons[0].source == "derived"
    assert "measured" in plan.reasons[0].why
    bare = plan_for("tesla-p4", toolchain=bare_toolchain)
    assert bare.backend == "embedded"
    assert "not on PATH" in bare.reasons[0].why


def test_sglang_on_the_cpu_is_refused(plan_for) -> None:
    with pytest.raises(PlanError, match="GPU"):
        plan_for("cpu", backend="sglang")
