"""bench/experiments/: llama-bench's JSON and log are parsed into rows with their buffers, each experiment's
findings and table are written into docs/EXPERIMENTS.md's blocks, and the curves into PNGs.

The inputs are a real llama-bench run recorded on a 2-core CPU (tests/bench/data/: the JSON as printed, the
log reduced to the context and buffer lines), made with `run_all.py --quick` sizes and the bundled
SmolLM2-135M Q4_1; there is no GPU here, so CUDA graphs and the power limit cannot show an effect."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
HERE = ROOT / "bench" / "experiments"
DATA = Path(__file__).resolve().parent / "data"
DOC = ROOT / "docs" / "EXPERIMENTS.md"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# recorded run -> (experiment, label the runner gives its rows)
RECORDED = {
    "flash_attn": ("flash_attn", "flash attention"),
    "kv_types_f16": ("kv_types", "f16"),
    "kv_types_q8_0": ("kv_types", "q8_0"),
    "kv_types_q4_0": ("kv_types", "q4_0"),
    "batch_sizes": ("batch_sizes", "n_ubatch"),
    "cuda_graphs_on": ("cuda_graphs", "graphs on"),
    "cuda_graphs_off": ("cuda_graphs", "graphs off"),
}


def _load(name: str) -> ModuleType:
    for path in (str(HERE), str(HERE.parent), str(ROOT)):
        if path not in sys.path:
            sys.path.insert(0, path)
    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return _load("llama_bench")


@pytest.fixture(scope="module")
def report() -> ModuleType:
    _load("llama_bench")
    _load("experiments")
    return _load("report")


@pytest.fixture(scope="module")
def rows(bench: ModuleType) -> dict[str, list]:  # type: ignore[type-arg]
    """Recorded rows per experiment, as run_all.py makes them."""
    out: dict[str, list] = {}  # type: ignore[type-arg]
    for stem, (experiment, label) in RECORDED.items():
        parsed = bench.parse_rows((DATA / f"{stem}.json").read_text(), label)
        out.setdefault(experiment, []).extend(bench.with_buffers(parsed, (DATA / f"{stem}.log").read_text()))
    return out


def test_rows_carry_llama_benchs_fields_and_their_buffers(rows: dict[str, list]) -> None:  # type: ignore[type-arg]
    fa = rows["flash_attn"]
    assert {r.flash_attn for r in fa} == {0, 1}
    assert {r.test for r in fa} == {"pp64", "tg8", "pp64 @ d512", "tg8 @ d512"}
    assert all(r.avg_ts > 0 and r.kv_mib and r.compute_mib for r in fa)
    assert all(r.backends == "CPU" and r.cpu_info and r.gpu_info == "" for r in fa)
    deep = next(r for r in fa if r.n_depth == 512 and r.is_prompt and r.flash_attn == 1)
    shallow = next(r for r in fa if r.n_depth == 0 and r.is_prompt and r.flash_attn == 1)
    assert deep.kv_mib > shallow.kv_mib  # a deeper context holds a bigger KV cache
    kv = {r.type_k: r.kv_mib for r in rows["kv_types"] if r.n_depth == 512 and not r.is_prompt}
    assert kv["f16"] > kv["q8_0"] > kv["q4_0"]


def test_gpu_buffer_lines_are_read_and_host_buffers_left_out(bench: ModuleType) -> None:
    log = ("llama_context: n_ctx                 = 4352\n"
           "llama_kv_cache:      CUDA0 KV buffer size =   544.00 MiB\n"
           "sched_reserve:      CUDA0 compute buffer size =   266.50 MiB\n"
           "sched_reserve:  CUDA_Host compute buffer size =    16.51 MiB\n"
           "llama_context: n_ctx                 = 512\n"
           "llama_kv_cache:      CUDA0 KV buffer size =    64.00 MiB\n")
    assert bench.context_buffers(log) == [{"KV": 544.0, "compute": 266.5}, {"KV": 64.0}]


def test_findings_tables_and_pngs(rows: dict[str, list], report: ModuleType, tmp_path: Path) -> None:  # type: ignore[type-arg]
    fa = report.flash_attn_findings(rows["flash_attn"])
    assert len(fa.measured) == 3 and "at depth 512" in fa.measured[0]
    assert fa.table.splitlines()[0].startswith("| depth | pp t/s off | pp t/s on |")
    assert len(fa.table.splitlines()) == 2 + 2  # header, rule, depths 0 and 512
    kv = report.kv_type_findings(rows["kv_types"])
    assert kv.measured[0].startswith("KV memory saved against f16: q8_0 ") and "q4_0 " in kv.measured[0]
    batch = report.batch_findings(rows["batch_sizes"])
    assert [line.split("|")[1].strip() for line in batch.table.splitlines()[2:]] == ["32", "64", "128", "256"]
    graphs = report.cuda_graph_findings(rows["cuda_graphs"])
    assert "CUDA backend only" in graphs.note  # a CPU run says the switch did nothing here
    for name, findings in (("fa", fa), ("batch", batch)):
        path = tmp_path / f"{name}.png"
        findings.png(path)
        assert path.read_bytes()[:8] == PNG_MAGIC


def test_power_findings_say_why_when_the_limit_cannot_change(report: ModuleType) -> None:
    refused = report.power_findings([], (), "changing the power limit needs root")
    assert refused.measured == ("not measured: changing the power limit needs root",)
    power = _load("power")
    from server.hardware.gpu_info import GpuInfo

    p4 = GpuInfo(index=0, name="Tesla P4", memory_total_bytes=1, memory_free_bytes=1, memory_used_bytes=0,
                 power_limit_w=75.0, power_default_limit_w=75.0, power_min_limit_w=60.0,
                 power_max_limit_w=75.0)
    assert power.power_limits(p4) == (75.0, 60.0)
    h200 = p4.model_copy(update={"power_limit_w": 700.0, "power_default_limit_w": 700.0,
                                 "power_min_limit_w": 200.0, "power_max_limit_w": 700.0})
    assert power.power_limits(h200) == (700.0, 525.0, 350.0)


def test_the_document_has_a_block_per_experiment(report: ModuleType, rows: dict[str, list]) -> None:  # type: ignore[type-arg]
    experiments = sys.modules["experiments"]
    doc = DOC.read_text()
    for exp in experiments.EXPERIMENTS.values():
        assert f"<!-- experiment:{exp.name} -->" in doc and f"<!-- /experiment:{exp.name} -->" in doc
        for claim in exp.expected:
            assert claim in doc, claim
    meta = report.RunMeta(date="2026-11-29", device="Test CPU", backends="CPU", build="1 (abc)",
                          model="llama 135M (smollm2.gguf)", command="llama-bench -m smollm2.gguf")
    exp = experiments.EXPERIMENTS["flash_attn"]
    body = report.section(exp, report.flash_attn_findings(rows["flash_attn"]), meta, "flash_attn.png")
    updated = report.replace_section(doc, "flash_attn", body)
    block = updated.split("<!-- experiment:flash_attn -->")[1].split("<!-- /experiment:flash_attn -->")[0]
    assert "on **Test CPU**" in block and "![" in block and "not run yet" not in block
    # The other blocks are untouched.
    assert updated.split("<!-- experiment:kv_types -->")[1] == doc.split("<!-- experiment:kv_types -->")[1]
    with pytest.raises(ValueError):
        report.replace_section("no blocks", "flash_attn", body)


# setup_env.sh links the llama.cpp tools it builds into the environment's bin, beside this Python.
TOOLS_PATH = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])


@pytest.mark.skipif(shutil.which("llama-bench", path=TOOLS_PATH) is None,
                    reason="no llama-bench on PATH or in the environment (a llama.cpp build)")
def test_run_all_on_the_cpu(tmp_path: Path) -> None:
    """The whole runner with the real llama-bench, tiny sizes and one thread, into a copy of the document."""
    from quantize.bundled import default_model_path

    doc = tmp_path / "EXPERIMENTS.md"
    doc.write_text(DOC.read_text())
    proc = subprocess.run(
        [sys.executable, str(HERE / "run_all.py"), "--quick", "--model", str(default_model_path()),
         "--only", "flash_attn,cuda_graphs", "--doc", str(doc), "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600, check=False,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PATH": TOOLS_PATH})
    assert proc.returncode == 0, proc.stderr
    text = doc.read_text()
    fa_block = text.split("<!-- experiment:flash_attn -->")[1].split("<!-- /experiment:flash_attn -->")[0]
    assert "not run yet" not in fa_block and "| depth |" in fa_block
    assert (tmp_path / "experiments" / "flash_attn.png").read_bytes()[:8] == PNG_MAGIC
    assert (tmp_path / "experiments.json").is_file()
