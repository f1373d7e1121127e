"""Per-card profiles: one per card id, package data loaded with pydantic-settings, overridden by env and CLI
with sources; the keys of earlier versions still read, with a deprecation warning."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.hardware.cards import card_ids
from server.launch.profile import (
    DEPRECATED_KEYS,
    Profile,
    ProfileError,
    default_profiles_dir,
    load_profile,
    profile_file_name,
    read_profile_file,
)


@pytest.mark.parametrize("card", [*card_ids(), "cpu"])
def test_every_card_has_a_valid_profile(card: str) -> None:
    path = default_profiles_dir() / profile_file_name(card)
    assert path.is_file(), f"missing {path.name}"
    resolved = load_profile(card)
    assert resolved.path == str(path)
    assert resolved.profile.card == card
    file_keys = set(read_profile_file(path))
    for field, source in resolved.sources.items():
        assert source == ("profile" if field in file_keys else "default")


def test_p4_profile_prefers_llama_cpp() -> None:
    p = load_profile("tesla-p4").profile
    assert p.preferred_backend == "llama-server" and p.kv_type == "q8_0" and p.flash_attn == "on"


def test_env_beats_file_and_cli_beats_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGESERVE_N_CTX", "1536")
    monkeypatch.setenv("EDGESERVE_N_PARALLEL", "3")
    resolved = load_profile("rtx-4090", {"n_parallel": 7})
    assert resolved.profile.n_ctx == 1536 and resolved.source("n_ctx") == "env"
    assert resolved.profile.n_parallel == 7 and resolved.source("n_parallel") == "cli"
    assert resolved.source("gpu_memory_utilization") == "profile"
    assert resolved.source("n_threads") == "default"


def test_plan_reasons_name_each_source(monkeypatch: pytest.MonkeyPatch, plan_for) -> None:
    monkeypatch.setenv("EDGESERVE_N_CTX", "1024")
    plan = plan_for("rtx-4090", backend="llama-server", n_parallel=2)
    sources = {r.setting: r.source for r in plan.reasons}
    assert sources["n_ctx"] == "env" and plan.n_ctx == 1024
    assert sources["n_parallel"] == "cli" and plan.n_parallel == 2
    assert sources["gpu_memory_utilization"] == "profile"
    assert sources["backend"] == "cli"
    assert sources["kv_type"] == "derived"  # profile says auto -> llama.cpp f16
    assert sources["n_ubatch"] == "default"
    assert {r.source for r in plan.reasons} <= {"profile", "cli", "env", "derived", "default"}


def test_unknown_yaml_key_is_an_error_naming_the_file(tmp_path: Path) -> None:
    (tmp_path / "rtx_4090.yaml").write_text("card: rtx-4090\ncache_max_entry_count: 8192\n")
    with pytest.raises(ProfileError, match=r"rtx_4090\.yaml: unknown setting\(s\) cache_max_entry_count"):
        load_profile("rtx-4090", profiles_dir=tmp_path)


def test_bad_value_is_an_error_naming_the_file(tmp_path: Path) -> None:
    (tmp_path / "l4.yaml").write_text("gpu_memory_utilization: 1.5\n")
    with pytest.raises(ProfileError, match=r"l4\.yaml: gpu_memory_utilization"):
        load_profile("l4", profiles_dir=tmp_path)


def test_file_for_another_card_is_refused(tmp_path: Path) -> None:
    (tmp_path / "l4.yaml").write_text("card: a10\n")
    with pytest.raises(ProfileError, match="says card 'a10'"):
        load_profile("l4", profiles_dir=tmp_path)


def test_a_card_without_a_file_gets_the_defaults(tmp_path: Path) -> None:
    resolved = load_profile("h200", profiles_dir=tmp_path)
    assert resolved.path is None
    assert resolved.profile == Profile.model_validate({})
    assert set(resolved.sources.values()) == {"default"}


def test_old_keys_read_as_the_new_ones_with_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    old = {
        "context": 3072, "max_num_seqs": 6, "kv_cache_dtype": "q8_0", "max_num_batched_tokens": 1024,
        "ubatch_size": 256, "threads": 3, "mem_fraction_static": 0.8, "enable_prefix_caching": False,
        "data_parallel_size": 1,
    }
    assert set(old) == set(DEPRECATED_KEYS)
    (tmp_path / "l4.yaml").write_text("".join(f"{k}: {str(v).lower()}\n" for k, v in old.items()))
    with caplog.at_level("WARNING", logger="server.launch.profile"):
        resolved = load_profile("l4", profiles_dir=tmp_path)
    for key, value in old.items():
        new = DEPRECATED_KEYS[key]
        assert resolved.value(new) == value and resolved.source(new) == "profile"
        assert any(repr(key) in r.message and repr(new) in r.message for r in caplog.records)
    # the old spelling of an environment variable too; `context` was per sequence then as now
    monkeypatch.setenv("EDGESERVE_CONTEXT", "1536")
    resolved = load_profile("l4", profiles_dir=tmp_path)
    assert resolved.profile.n_ctx == 1536 and resolved.source("n_ctx") == "env"


def test_profiles_are_package_data() -> None:
    # read through importlib.resources (a wheel install has them), not from a path beside the sources
    assert default_profiles_dir().joinpath("tesla_p4.yaml").is_file()
    assert "tesla_p4.yaml" in {p.name for p in default_profiles_dir().iterdir()}


def test_tuned_profile_lies_between_the_card_profile_and_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clean_env: None, plan_for
) -> None:
    from loadtest.tuned import write_tuned_profile

    note = "from edgeserve tune on 2026-11-29 (goodput 1.5 req/s at TTFT p95 <= 2000 ms)"
    path = write_tuned_profile("rtx-4090", {"n_parallel": 12, "n_ctx": 3072, "n_ubatch": 256}, note,
                               directory=tmp_path)
    assert path == tmp_path / "rtx_4090.yaml"
    monkeypatch.setenv("EDGESERVE_TUNED_DIR", str(tmp_path))
    monkeypatch.setenv("EDGESERVE_N_CTX", "1536")
    resolved = load_profile("rtx-4090", {"n_ubatch": 128})
    assert resolved.tuned_path == str(path) and resolved.tuned_by == note
    assert resolved.profile.n_parallel == 12 and resolved.source("n_parallel") == "tuned"
    assert resolved.profile.n_ctx == 1536 and resolved.source("n_ctx") == "env"  # env beats the tune
    assert resolved.profile.n_ubatch == 128 and resolved.source("n_ubatch") == "cli"  # and the CLI too
    assert resolved.source("gpu_memory_utilization") == "profile"
    plan = plan_for("rtx-4090", backend="llama-server")
    reason = plan.reason("n_parallel")
    assert reason is not None and reason.source == "tuned" and plan.n_parallel == 12
    assert "tuned profile" in reason.why and note in reason.why
    # A tuned value outlives its tune: the plan says which file holds it and how to drop it.
    assert reason.why.endswith(f"({path}; undo: edgeserve tune forget --card rtx-4090)")
    # Another card's launch never sees it; without EDGESERVE_TUNED_DIR it is looked for under XDG_CONFIG_HOME.
    assert load_profile("l4").tuned_path is None
    monkeypatch.delenv("EDGESERVE_TUNED_DIR")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    write_tuned_profile("l4", {"n_parallel": 3}, note, directory=tmp_path / "xdg" / "edgeserve" / "tuned")
    assert load_profile("l4").source("n_parallel") == "tuned"



def test_tuned_profile_is_checked_like_a_profile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from loadtest.tuned import write_tuned_profile

    with pytest.raises(ValueError, match="n_parallel"):
        write_tuned_profile("l4", {"n_parallel": 0}, "x", directory=tmp_path)
    (tmp_path / "l4.yaml").write_text("card: l4\ntuned_by: x\nslots: 3\n")
    monkeypatch.setenv("EDGESERVE_TUNED_DIR", str(tmp_path))
    with pytest.raises(ProfileError, match=r"l4.yaml: unknown setting\(s\) slots"):
        load_profile("l4")
    (tmp_path / "l4.yaml").write_text("card: t4\nn_parallel: 3\n")
    with pytest.raises(ProfileError, match="another card"):
        load_profile("l4")
