"""`edgeserve quantize` end to end on a synthetic F16 model, with llama.cpp doing the quantization."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
from typer.testing import CliRunner

from quantize.budget.auto_level import choose_level
from quantize.imatrix import ImatrixError, load_imatrix
from quantize.llama_session import LlamaSession, default_threads
from quantize.manifest import manifest_path
from quantize.model.gguf_file import read_model_spec
from quantize.model.levels import get_level
from quantize.pipeline import PipelineError, QuantizeOptions, _check_disk, execute, prepare, resolve_level
from quantize.runner import TensorProgress
from quantize.synthetic import LLAMA31_8B, TINY, synthetic_model_spec, write_synthetic_gguf
from server.cli.app import app
from server.hardware.cards import GpuSet, get_card

LEVELS = ("Q8_0", "Q6_K", "Q4_K_M")


def run_cli(*args: str) -> Any:
    return CliRunner().invoke(app, ["quantize", *args])


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_gguf(tmp_path_factory.mktemp("models") / "tiny-F16.gguf", TINY, seed=3)


@pytest.fixture(scope="module")
def outputs(src: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict[str, Any]]]:
    out_dir = tmp_path_factory.mktemp("out")
    done = {}
    for level in LEVELS:
        out = out_dir / f"tiny.{level}.gguf"
        result = run_cli(str(src), "--level", level, "--out", str(out), "--json")
        assert result.exit_code == 0, result.output
        done[level] = (out, json.loads(result.stdout))
    return done


def write_imatrix(spec_path: Path, path: Path, *, width_fraction: int = 1) -> None:
    """An importance matrix in llama-imatrix's GGUF format for every 2-D weight but the embedding."""
    writer = gguf.GGUFWriter(path, arch="imatrix")
    writer.add_key_value(
        "imatrix.datasets", ["edgeserve test"], gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.STRING
    )
    writer.add_uint32("imatrix.chunk_count", 4)
    writer.add_uint32("imatrix.chunk_size", 512)
    rng = np.random.default_rng(0)
    for t in read_model_spec(spec_path).tensors:
        if t.n_dims == 2 and t.name != "token_embd.weight":
            ne0 = t.shape[0] // width_fraction
            writer.add_tensor(f"{t.name}.in_sum2", (rng.random(ne0, dtype=np.float32) * 4 + 0.1) * 2048)
            writer.add_tensor(f"{t.name}.counts", np.array([2048.0], dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def files_in(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


@pytest.mark.parametrize("level", LEVELS)
def test_each_level_end_to_end(
    src: Path, outputs: dict[str, tuple[Path, dict[str, Any]]], level: str
) -> None:
    out, manifest = outputs[level]
    assert out.is_file()
    assert json.loads(manifest_path(out).read_text()) == manifest
    assert manifest["level"] == level
    assert manifest["llama_ftype"] == get_level(level).llama_ftype
    assert all(c["is_ok"] for c in manifest["checks"]), manifest["checks"]
    assert {c["name"] for c in manifest["checks"]} >= {"gguf", "file type", "tensor types", "size", "decode"}
    assert manifest["output"]["size_bytes"] == out.stat().st_size
    assert abs(manifest["expected_bytes"] - out.stat().st_size) < 4096
    assert manifest["source"]["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert manifest["source"]["file_type"] == "F16"
    assert manifest["llama"]["llama_cpp_python"] == "0.3.36"
    assert manifest["llama"]["system_info"]
    assert manifest["n_threads"] == default_threads()  # no --threads: every usable CPU
    assert manifest["budget"] is None
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".partial")]


def test_types_and_bits_per_weight(outputs: dict[str, tuple[Path, dict[str, Any]]]) -> None:
    assert outputs["Q8_0"][1]["tensor_types"] == {"Q8_0": 16, "F32": 5}
    assert outputs["Q6_K"][1]["tensor_types"] == {"Q6_K": 16, "F32": 5}
    assert outputs["Q8_0"][1]["bits_per_weight"] == pytest.approx(8.5, abs=0.01)
    assert outputs["Q6_K"][1]["bits_per_weight"] == pytest.approx(6.5625, abs=0.01)
    bpw = outputs["Q4_K_M"][1]["bits_per_weight"]
    assert 4.5 < bpw < 6.5
    sizes = [outputs[lv][1]["output"]["size_bytes"] for lv in LEVELS]
    assert sizes == sorted(sizes, reverse=True)


def test_q4_k_m_has_the_q4_k_q6_k_mix_llama_cpp_makes(
    outputs: dict[str, tuple[Path, dict[str, Any]]],
) -> None:
    out, manifest = outputs["Q4_K_M"]
    types = {t.name: t.ggml_type for t in read_model_spec(out).tensors}
    assert set(manifest["tensor_types"]) == {"Q4_K", "Q6_K", "F32"}
    # output Q6_K; attn_v / ffn_down Q6_K in the layers use_more_bits picks (of 2 layers: the last one)
    assert types["output.weight"] == "Q6_K"
    assert types["blk.1.attn_v.weight"] == types["blk.1.ffn_down.weight"] == "Q6_K"
    assert types["blk.0.attn_v.weight"] == types["blk.0.ffn_down.weight"] == "Q4_K"
    assert (
        types["token_embd.weight"] == types["blk.0.attn_q.weight"] == types["blk.1.ffn_up.weight"] == "Q4_K"
    )
    with LlamaSession(out, n_ctx=64) as session:
        run = session.greedy("Once upon a time", 5, stop_at_eog=False)
    assert len(run.tokens) == 5


def test_auto_picks_different_levels_for_p4_and_5090() -> None:
    spec = synthetic_model_spec(LLAMA31_8B, 128256, name="Llama-3.1-8B-shaped")
    p4 = choose_level(spec, GpuSet.of(get_card("tesla-p4")), n_ctx=8192)
    rtx = choose_level(spec, GpuSet.of(get_card("rtx-5090")), n_ctx=8192)
    assert p4.level.name != rtx.level.name
    assert p4.level.quality_rank < rtx.level.quality_rank
    assert p4.budget.fits and rtx.budget.fits
    # the P4 pick is the best that fits: every better candidate does not
    better = [b for lv, b in p4.candidates if lv.quality_rank > p4.level.quality_rank]
    assert better and not any(b.fits for b in better)


def test_auto_on_the_cli_shows_candidates_and_records_the_budget(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "auto.gguf"
    result = run_cli(str(src), "--card", "rtx-5090", "--ctx", "8192", "--parallel", "2", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "level auto: rtx-5090" in result.stderr and "chose Q8_0" in result.stderr
    manifest = json.loads(manifest_path(out).read_text())
    assert manifest["level"] == "Q8_0"
    assert manifest["budget"]["chosen_for"]["card"] == "rtx-5090"
    assert manifest["budget"]["chosen_for"]["n_ctx"] == 8192
    assert manifest["budget"]["chosen_for"]["n_parallel"] == 2
    assert manifest["budget"]["budget"]["fits"] is True


def test_existing_output_is_kept_without_force(
    src: Path, outputs: dict[str, tuple[Path, dict[str, Any]]]
) -> None:
    out, _ = outputs["Q8_0"]
    before = (out.stat().st_mtime_ns, out.stat().st_size)
    result = run_cli(str(src), "--level", "Q6_K", "--out", str(out))
    assert result.exit_code == 2
    assert "exists; pass --force" in result.stderr
    assert (out.stat().st_mtime_ns, out.stat().st_size) == before


def test_force_overwrites(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.gguf"
    out.write_bytes(b"old")
    result = run_cli(str(src), "--level", "Q4_0", "--out", str(out), "--force")
    assert result.exit_code == 0, result.output
    assert read_model_spec(out).file_type_name == "Q4_0"
    assert files_in(tmp_path) == ["m.gguf", "m.manifest.json"]


def _bad_inputs(src: Path, quantized: Path, d: Path) -> list[tuple[list[str], str]]:
    (d / "notes.gguf").write_text("this is not a model, only some notes about one\n" * 20)
    (d / "half.gguf").write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    (d / "imatrix.dat").write_bytes(b"\x00\x01")
    out = ["--out", str(d / "out.gguf")]
    return [
        ([str(d / "notes.gguf"), "--level", "Q8_0", *out], "not a GGUF file"),
        ([str(d / "half.gguf"), "--level", "Q8_0", *out], "truncated"),
        ([str(d / "missing.gguf"), "--level", "Q8_0", *out], "no such file"),
        ([str(src), "--level", "Q7_X", *out], "unknown quantization level 'Q7_X'; supported: F16, Q8_0"),
        ([str(quantized), "--level", "Q4_0", *out], "already quantized (Q8_0)"),
        ([str(src), "--level", "Q4_0", "--imatrix", str(d / "imatrix.dat"), *out], "imatrix"),
        ([str(src), "--levels", "Q8_0,Q8_0", "--out-dir", str(d)], "lists a level twice"),
        ([str(src), "--card", "no-such-card", *out], "unknown card 'no-such-card'"),
    ]


def test_bad_inputs_fail_in_one_line_and_leave_nothing(
    src: Path, outputs: dict[str, tuple[Path, dict[str, Any]]], tmp_path: Path
) -> None:
    cases = _bad_inputs(src, outputs["Q8_0"][0], tmp_path)
    before = files_in(tmp_path)
    for args, message in cases:
        result = run_cli(*args)
        assert result.exit_code == 2, (args, result.output)
        assert isinstance(result.exception, SystemExit), result.exception
        assert "Traceback" not in result.output
        assert message in result.stderr, (message, result.stderr)
        assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
        assert files_in(tmp_path) == before, args
    assert "--allow-requantize" in run_cli(*cases[4][0]).stderr


def test_llama_cpp_failure_midway_leaves_nothing(src: Path, tmp_path: Path) -> None:
    imatrix = tmp_path / "narrow.imatrix.gguf"
    write_imatrix(src, imatrix, width_fraction=2)  # half as wide as the weights: llama.cpp refuses mid-run
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    result = run_cli(
        str(src), "--level", "Q4_K_M", "--imatrix", str(imatrix), "--out", str(out_dir / "x.gguf")
    )
    assert result.exit_code == 2
    assert "llama.cpp could not quantize" in result.stderr and "imatrix size" in result.stderr
    assert files_in(out_dir) == []


def test_interrupt_leaves_nothing(src: Path, tmp_path: Path) -> None:
    plan = prepare(src, resolve_level("Q6_K"), QuantizeOptions(out=tmp_path / "i.gguf"))
    seen: list[TensorProgress] = []

    def interrupt(p: TensorProgress) -> None:
        seen.append(p)
        if p.index == 3 and p.is_done:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        execute(plan, on_progress=interrupt)
    assert files_in(tmp_path) == []
    assert [p.index for p in seen if p.is_done] == [1, 2, 3]
    assert seen[0].total == 21


def test_imatrix_is_used(src: Path, outputs: dict[str, tuple[Path, dict[str, Any]]], tmp_path: Path) -> None:
    imatrix = tmp_path / "im.gguf"
    write_imatrix(src, imatrix)
    with_im, without = tmp_path / "with.gguf", tmp_path / "without.gguf"
    assert (
        run_cli(str(src), "--level", "IQ4_XS", "--imatrix", str(imatrix), "--out", str(with_im)).exit_code
        == 0
    )
    assert run_cli(str(src), "--level", "IQ4_XS", "--out", str(without)).exit_code == 0
    assert json.loads(manifest_path(with_im).read_text())["imatrix"] == str(imatrix)
    a = {t.name: t.data.tobytes() for t in gguf.GGUFReader(with_im).tensors}
    b = {t.name: t.data.tobytes() for t in gguf.GGUFReader(without).tensors}
    assert a["blk.0.attn_q.weight"] != b["blk.0.attn_q.weight"]  # weighted by the importance matrix
    assert a["token_embd.weight"] == b["token_embd.weight"]  # no entry for it in the matrix


def test_legacy_imatrix_is_normalised_like_llama_quantize(tmp_path: Path) -> None:
    path = tmp_path / "legacy.dat"
    name = b"blk.0.attn_q.weight"
    sums = np.array([2.0, 4.0, 6.0, 8.0], dtype="<f4")
    dataset = b"wiki.train.raw"
    entry = struct.pack("<i", len(name)) + name + struct.pack("<ii", 2, 4) + sums.tobytes()
    body = struct.pack("<i", 1) + entry
    path.write_bytes(body + struct.pack("<ii", 10, len(dataset)) + dataset)
    im = load_imatrix(path)
    assert list(im.entries) == ["blk.0.attn_q.weight"]
    assert im.entries["blk.0.attn_q.weight"].tolist() == [1.0, 2.0, 3.0, 4.0]  # sums / ncall
    assert (im.chunk_count, im.datasets) == (10, ("wiki.train.raw",))
    path.write_bytes(body[:-4])
    with pytest.raises(ImatrixError, match="truncated"):
        load_imatrix(path)


def test_disk_space_is_checked_first(tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match="not enough free space"):
        _check_disk(tmp_path / "big.gguf", 1 << 60)
    assert files_in(tmp_path) == []


def test_quality_table_from_an_f16_source_is_not_indicative(src: Path, tmp_path: Path) -> None:
    result = run_cli(
        str(src),
        "--levels",
        "Q4_0",
        "--out-dir",
        str(tmp_path),
        "--eval-ctx",
        "64",
        "--eval-tokens",
        "128",
        "--json",
    )
    assert result.exit_code == 0, result.output
    table = json.loads(result.stdout)
    assert table["is_indicative"] is False and table["note"] == ""
    source, q4 = table["rows"]
    assert source["label"] == "source (F16)" and q4["label"] == "Q4_0"
    # random weights: close to a uniform guess over the vocabulary, for the source and its quantization alike
    assert source["ppl"] > 1000 and q4["ppl"] > 1000
    assert files_in(tmp_path) == ["tiny.Q4_0.gguf", "tiny.Q4_0.manifest.json"]
