"""The quality table and perplexity, on the bundled SmolLM2 (a real model, so perplexity means something)."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
from typer.testing import CliRunner

from quantize.bundled import smollm2_path
from quantize.eval_table import default_eval_text
from quantize.llama_session import LlamaSession
from quantize.perplexity import EvalTextTooShortError, perplexity
from server.cli.app import app

EVAL_CTX = 128
EVAL_TOKENS = 512


def test_the_shipped_text_is_long_public_domain_prose() -> None:
    text = default_eval_text().read_text(encoding="utf-8")
    assert len(text.split()) > 3000
    assert text.startswith("It is a truth universally acknowledged")


def test_perplexity_follows_llama_perplexity_windows_and_knows_english() -> None:
    text = default_eval_text().read_text(encoding="utf-8")
    words = text.split()
    random.Random(0).shuffle(words)
    with LlamaSession(smollm2_path(), n_ctx=EVAL_CTX) as session:
        real = perplexity(session, text, max_tokens=EVAL_TOKENS)
        shuffled = perplexity(session, " ".join(words), max_tokens=EVAL_TOKENS)
        with pytest.raises(EvalTextTooShortError):
            perplexity(session, "Too short.")
    assert real.n_chunks == EVAL_TOKENS // EVAL_CTX
    # the second half of each window is scored: tokens n_ctx/2+1 .. n_ctx-1
    assert real.n_scored == real.n_chunks * (EVAL_CTX - 1 - EVAL_CTX // 2)
    assert 1.0 < real.ppl < 100.0
    assert real.ppl == pytest.approx(math.exp(real.nll_mean))
    assert shuffled.ppl > 3 * real.ppl


def test_quality_table_on_a_requantized_real_model_says_indicative(tmp_path: Path) -> None:
    args = [
        "quantize",
        str(smollm2_path()),
        "--levels",
        "Q8_0,Q4_K_M",
        "--allow-requantize",
        "--out-dir",
        str(tmp_path),
        "--eval-ctx",
        str(EVAL_CTX),
        "--eval-tokens",
        str(EVAL_TOKENS),
        "--threads",
        "1",
    ]
    result = CliRunner(env={"COLUMNS": "200"}).invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "indicative only" in result.stdout
    for col in ("perplexity", "vs source", "decode tok/s", "bits/weight"):
        assert col in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "SmolLM2-135M-Instruct.Q4_K_M.gguf",
        "SmolLM2-135M-Instruct.Q4_K_M.manifest.json",
        "SmolLM2-135M-Instruct.Q8_0.gguf",
        "SmolLM2-135M-Instruct.Q8_0.manifest.json",
    ]

    again = CliRunner().invoke(app, [*args, "--force", "--json"])
    assert again.exit_code == 0, again.output
    table = json.loads(again.stdout)
    assert table["is_indicative"] is True and "indicative only" in table["note"]
    rows = {r["label"]: r for r in table["rows"]}
    assert set(rows) == {"source (Q4_1)", "Q8_0", "Q4_K_M"}
    source, q8, q4 = rows["source (Q4_1)"], rows["Q8_0"], rows["Q4_K_M"]
    assert source["ppl_increase"] is None
    for row in (source, q8, q4):
        assert 1.0 < row["ppl"] < 100.0
        assert row["decode_tokens_per_second"] > 0
    # requantizing Q4_1 to Q8_0 keeps nearly everything; Q4_K_M loses more
    assert abs(q8["ppl_increase"]) < 0.02
    assert q4["ppl_increase"] > q8["ppl_increase"]
    assert q8["size_bytes"] > q4["size_bytes"]
    assert table["n_chunks"] == EVAL_TOKENS // EVAL_CTX


def test_requantizing_without_the_flag_is_refused(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["quantize", str(smollm2_path()), "--levels", "Q8_0", "--out-dir", str(tmp_path)]
    )
    assert result.exit_code == 2
    assert "already quantized (Q4_1)" in result.stderr and "--allow-requantize" in result.stderr
    assert list(tmp_path.iterdir()) == []
