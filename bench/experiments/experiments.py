"""Seed 002's experiments, done with llama.cpp: what each runs (llama-bench arguments) and what seed 002
expected. Flash attention against context length, KV cache types, batch / ubatch sizes, CUDA graphs on and
off, and decode speed under a lowered power limit (power.py changes the limit; this file only names runs)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from llama_bench import BenchRun


@dataclass(frozen=True)
class Sizes:
    """How big the tests are: GPU for the GPU host (an 8B model), QUICK for a CPU run of the scripts."""

    depths: tuple[int, ...]
    n_prompt: int
    n_gen: int
    reps: int
    batch: int
    ubatches: tuple[int, ...]
    n_gpu_layers: int
    threads: int | None = None

    @property
    def deepest(self) -> int:
        return max(self.depths)

    def common(self) -> list[str]:
        args = ["-ngl", str(self.n_gpu_layers), "-r", str(self.reps)]
        return args + (["-t", str(self.threads)] if self.threads else [])


GPU = Sizes(depths=(0, 4096, 16384, 32768), n_prompt=512, n_gen=64, reps=3, batch=2048,
            ubatches=(128, 256, 512, 1024, 2048), n_gpu_layers=99)
QUICK = Sizes(depths=(0, 512), n_prompt=64, n_gen=8, reps=1, batch=256, ubatches=(32, 64, 128, 256),
              n_gpu_layers=0, threads=1)

KV_TYPES = ("f16", "q8_0", "q4_0")
GRAPHS_OFF = {"GGML_CUDA_DISABLE_GRAPHS": "1"}


@dataclass(frozen=True)
class Experiment:
    name: str
    title: str
    expected: tuple[str, ...]  # seed 002's "expected results", quoted
    runs: Callable[[Sizes], Sequence[BenchRun]]


def _pp_tg(s: Sizes) -> list[str]:
    return ["-p", str(s.n_prompt), "-n", str(s.n_gen)]


def flash_attn_runs(s: Sizes) -> list[BenchRun]:
    depths = ",".join(str(d) for d in s.depths)
    return [BenchRun("flash attention", (*s.common(), "-fa", "off,on", *_pp_tg(s), "-d", depths))]


def kv_type_runs(s: Sizes) -> list[BenchRun]:
    # One run per type: llama-bench would otherwise try every K type with every V type.
    return [BenchRun(t, (*s.common(), "-fa", "on", "-ctk", t, "-ctv", t, *_pp_tg(s), "-d", f"0,{s.deepest}"))
            for t in KV_TYPES]


def batch_runs(s: Sizes) -> list[BenchRun]:
    ubatches = ",".join(str(u) for u in s.ubatches)
    return [BenchRun("n_ubatch", (*s.common(), "-fa", "on", "-p", str(s.batch), "-n", "0", "-b", str(s.batch),
                                  "-ub", ubatches))]


def cuda_graph_runs(s: Sizes) -> list[BenchRun]:
    args = (*s.common(), "-fa", "on", *_pp_tg(s))
    return [BenchRun("graphs on", args), BenchRun("graphs off", args, GRAPHS_OFF)]


def power_run(s: Sizes, watts: float) -> BenchRun:
    return BenchRun(f"{watts:g} W", (*s.common(), "-fa", "on", *_pp_tg(s)))


EXPERIMENTS: dict[str, Experiment] = {
    e.name: e
    for e in (
        Experiment(
            "flash_attn", "Flash attention against context length",
            ("2-4x speedup for long sequences", "10-20 times memory reduction for attention layers",
             "Better scaling with sequence length"),
            flash_attn_runs,
        ),
        Experiment(
            "kv_types", "KV cache f16 / q8_0 / q4_0: memory and speed",
            ("Memory savings: FP8 (50%), INT8 (50-75%) (seed 002's 2.1 is about weights; the nearest claim)",
             "FP8: approximately 1.5-2 times faster than FP16; INT8: approximately 2-3 times faster"),
            kv_type_runs,
        ),
        Experiment(
            "batch_sizes", "Batch / ubatch sizes (prompt processing)",
            ("Throughput: 3-5 times improvement with proper batching and streaming",),
            batch_runs,
        ),
        Experiment(
            "cuda_graphs", "CUDA graphs on / off (GGML_CUDA_DISABLE_GRAPHS)",
            ("10-30% latency reduction for small batches", "No benefit for dynamic shapes"),
            cuda_graph_runs,
        ),
        Experiment(
            "power_limit", "Decode speed under a lowered power limit",
            ("Power Efficiency: 20-30% better performance per watt with tuning",),
            lambda s: [],  # power.py makes one run per limit, after setting it
        ),
    )
}
