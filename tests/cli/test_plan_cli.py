"""`edgeserve plan` end to end through typer, on the bundled model and every card of the table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from server.cli import plan
from server.hardware.cards import card_ids

REQUIRED_KEYS = {
    "card",
    "gpus",
    "backend",
    "quant",
    "n_ctx",
    "n_parallel",
    "kv_type",
    "flash_attn",
    "weights_bytes",
    "kv_bytes",
    "compute_bytes",
    "overhead_bytes",
    "total_bytes",
    "fits",
    "headroom_bytes",
}


@pytest.fixture(scope="module")
def app() -> typer.Typer:
    app = typer.Typer(pretty_exceptions_enable=False)
    plan.register(app)

    @app.command("noop", hidden=True)
    def _noop() -> None:  # a second command keeps `plan` a subcommand, as in the real app
        pass

    return app


def run(app: typer.Typer, *args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, ["plan", *args])
    return result.exit_code, result.stdout, result.stderr


def run_json(app: typer.Typer, *args: str) -> dict[str, object]:
    code, out, err = run(app, *args, "--json")
    assert code == 0, err
    data = json.loads(out)
    assert isinstance(data, dict)
    return data


@pytest.mark.parametrize("card", card_ids())
def test_plan_answers_for_every_card(app: typer.Typer, card: str) -> None:
    data = run_json(app, "--card", card, "--ctx", "8192", "--parallel", "2")
    assert data.keys() >= REQUIRED_KEYS
    assert data["card"] == card and data["gpus"] == 1 and data["backend"] == "llama-server"
    assert data["n_ctx"] == 8192 and data["n_parallel"] == 2 and data["quant"] == "Q4_1"
    assert data["fits"] is True  # a 135M model fits every card
    total = data["weights_bytes"] + data["kv_bytes"] + data["compute_bytes"] + data["overhead_bytes"]  # type: ignore[operator]
    assert data["total_bytes"] == total
    table = data["table"]
    assert isinstance(table, dict) and len(table["rows"]) >= 12 and table["best"][0] == "F16"


def test_rtx_5090_pair(app: typer.Typer) -> None:
    data = run_json(app, "--card", "RTX-5090", "--gpus", "2", "--ctx", "16384", "--parallel", "4")
    assert data["card"] == "rtx-5090" and data["gpus"] == 2
    per_gpu = data["per_gpu"]
    assert isinstance(per_gpu, list) and len(per_gpu) == 2
    assert per_gpu[1]["has_output"] and not per_gpu[0]["has_output"]
    sg = run_json(app, "--card", "rtx-5090", "--gpus", "2", "--backend", "sglang", "--ctx", "16384")
    assert sg["sglang"]["tp_size"] == 2 and sg["kv_type"] == "auto"  # type: ignore[index]


def test_marketing_name_and_level(app: typer.Typer) -> None:
    data = run_json(app, "--card", "NVIDIA GeForce RTX 4090", "--level", "q8_0")
    assert data["card"] == "rtx-4090" and data["quant"] == "Q8_0" and data["is_estimated_quant"] is True


def test_rich_output_has_verdict_and_table(app: typer.Typer) -> None:
    code, out, _ = run(app, "--card", "tesla-p4", "--ctx", "4096")
    assert code == 0
    assert "FITS" in out and "best" in out and "Q4_K_M" in out and "KV cache" in out


def test_auto_card_works_without_a_gpu(app: typer.Typer) -> None:
    data = run_json(app, "--card", "auto")
    assert data.keys() >= REQUIRED_KEYS
    assert data["card"] == "cpu" or data["gpus"] >= 1  # type: ignore[operator]


def test_unknown_card_is_one_line_listing_ids(app: typer.Typer) -> None:
    code, out, err = run(app, "--card", "voodoo-5")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "tesla-p4" in err and "rtx-5090" in err
    assert "Traceback" not in err


def test_sglang_refused_on_p4(app: typer.Typer) -> None:
    code, _, err = run(app, "--card", "tesla-p4", "--backend", "sglang")
    assert code == 2 and "SGLang cannot run on Tesla P4" in err


def test_quantized_kv_without_flash_attention(app: typer.Typer) -> None:
    code, _, err = run(app, "--card", "rtx-3090", "--kv-type", "q8_0", "--flash-attn", "off")
    assert code == 2 and "flash attention" in err


def test_bad_model_file_is_named(app: typer.Typer, tmp_path: Path) -> None:
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 20)
    code, _, err = run(app, "--model", str(bad), "--card", "l4")
    assert code == 2 and str(bad) in err.replace("\n", "") and "Traceback" not in err
    code, _, err = run(app, "--model", str(tmp_path / "nope.gguf"), "--card", "l4")
    assert code == 2 and "no such file" in err


def test_bad_level_and_backend(app: typer.Typer) -> None:
    code, _, err = run(app, "--card", "l4", "--level", "Q9")
    assert code == 2 and "Q4_K_M" in err
    code, _, err = run(app, "--card", "l4", "--backend", "vllm")
    assert code == 2 and "llama-server" in err
