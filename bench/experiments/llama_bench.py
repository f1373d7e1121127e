"""llama-bench as the experiments run it: `-o json` on stdout, llama.cpp's log (`-v`) on stderr, one row per
test with the KV and compute buffers its context allocated (llama-bench makes one context per test, and each
logs `llama_context: n_ctx = ...` before its buffers)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from memory_report import parse_buffer_log

# The devices whose buffers count: the GPUs, or the CPU in a CPU run (host staging buffers do not).
DEVICES = r"CUDA\d+|CPU"
CONTEXT_MARK = "llama_context: n_ctx "


@dataclass(frozen=True)
class BenchRow:
    """One llama-bench test: what ran (llama-bench's own field names) and how fast, and its buffers."""

    n_prompt: int
    n_gen: int
    n_depth: int
    n_batch: int
    n_ubatch: int
    type_k: str
    type_v: str
    flash_attn: int  # llama_flash_attn_type: -1 auto, 0 off, 1 on
    n_gpu_layers: int
    n_threads: int
    avg_ts: float
    stddev_ts: float
    gpu_info: str
    cpu_info: str
    backends: str
    build_commit: str
    build_number: int
    model_type: str
    label: str = ""  # which variant of an experiment it belongs to (e.g. "graphs off")
    kv_mib: float | None = None
    compute_mib: float | None = None

    @property
    def test(self) -> str:
        """llama-bench's own test name: pp512, tg128, pp512 @ d4096."""
        name = f"pp{self.n_prompt}" if self.n_prompt else f"tg{self.n_gen}"
        return name + (f" @ d{self.n_depth}" if self.n_depth else "")

    @property
    def is_prompt(self) -> bool:
        return self.n_prompt > 0


def parse_rows(json_text: str, label: str = "") -> list[BenchRow]:
    """llama-bench `-o json` output -> rows (fields it does not print are an error: a format change)."""
    rows = []
    for item in json.loads(json_text):
        rows.append(BenchRow(
            n_prompt=int(item["n_prompt"]), n_gen=int(item["n_gen"]), n_depth=int(item.get("n_depth", 0)),
            n_batch=int(item["n_batch"]), n_ubatch=int(item["n_ubatch"]), type_k=str(item["type_k"]),
            type_v=str(item["type_v"]), flash_attn=int(item["flash_attn"]),
            n_gpu_layers=int(item["n_gpu_layers"]), n_threads=int(item["n_threads"]),
            avg_ts=float(item["avg_ts"]), stddev_ts=float(item["stddev_ts"]), gpu_info=str(item["gpu_info"]),
            cpu_info=str(item["cpu_info"]), backends=str(item["backends"]),
            build_commit=str(item["build_commit"]), build_number=int(item["build_number"]),
            model_type=str(item["model_type"]), label=label,
        ))
    return rows


def context_buffers(log: str) -> list[dict[str, float]]:
    """The KV / compute buffers (MiB) of each context llama.cpp created, in order."""
    blocks = log.split(CONTEXT_MARK)[1:]
    return [parse_buffer_log(block, DEVICES) for block in blocks]


def with_buffers(rows: Sequence[BenchRow], log: str) -> list[BenchRow]:
    """Rows with the buffers of their own context; unchanged when the log does not have one per row."""
    buffers = context_buffers(log)
    if len(buffers) != len(rows):
        return list(rows)
    return [
        dataclasses.replace(row, kv_mib=b.get("KV"), compute_mib=b.get("compute"))
        for row, b in zip(rows, buffers, strict=True)
    ]


@dataclass(frozen=True)
class BenchRun:
    """One llama-bench invocation: its arguments (after -m), extra environment and a label for its rows."""

    label: str
    args: tuple[str, ...]
    env: Mapping[str, str] | None = None


@dataclass(frozen=True)
class BenchOutput:
    run: BenchRun
    command: str
    rows: tuple[BenchRow, ...]
    seconds: float
    error: str | None = None


def run_llama_bench(binary: str, model: Path, run: BenchRun, timeout_s: float = 600) -> BenchOutput:
    argv = [binary, "-m", str(model), *run.args, "-o", "json", "-v"]
    env = {**os.environ, **(run.env or {})}
    # As the document shows it: the program and the model by name, not where they lie on this machine.
    shown = " ".join([*(f"{k}={v}" for k, v in (run.env or {}).items()), Path(binary).name, "-m", model.name,
                      *argv[3:]])
    start = time.monotonic()
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, env=env, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return BenchOutput(run, shown, (), time.monotonic() - start, error=str(exc))
    seconds = time.monotonic() - start
    if proc.returncode != 0:
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
        return BenchOutput(run, shown, (), seconds, error=f"exit {proc.returncode}: {tail}")
    rows = with_buffers(parse_rows(proc.stdout, run.label), proc.stderr)
    return BenchOutput(run, shown, tuple(rows), seconds)
