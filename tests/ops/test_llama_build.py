"""What the llama.cpp build can run: parsing llama.cpp's own descriptions, the real probe of this machine's
(CPU) build, and the doctor's verdicts on llama-server."""

from __future__ import annotations

from pathlib import Path

from server.llama.build import (
    LlamaServerBuild,
    arch_of,
    cuda_runtime_from_libraries,
    parse_list_devices,
    parse_system_info,
    probe_llama_build,
    probe_llama_server,
)
from server.ops.doctor import run_checks
from server.ops.snapshot import HostSnapshot

# llama_print_system_info() of a CUDA build (format: src/llama.cpp, ggml-cuda.cu's feature list).
CUDA_INFO = ("CUDA : ARCHS = 610,750,860 | USE_GRAPHS = 1 | PEER_MAX_BATCH_SIZE = 128 | "
             "CPU : SSE3 = 1 | AVX2 = 1 | OPENMP = 1 | REPACK = 1 | ")


def test_system_info_is_split_per_backend() -> None:
    backends = parse_system_info(CUDA_INFO)
    assert backends == {
        "CUDA": {"ARCHS": "610,750,860", "USE_GRAPHS": "1", "PEER_MAX_BATCH_SIZE": "128"},
        "CPU": {"SSE3": "1", "AVX2": "1", "OPENMP": "1", "REPACK": "1"},
    }
    assert parse_system_info("") == {}


def test_cuda_runtime_and_archs() -> None:
    libs = ["/usr/lib/libc.so.6", "/opt/l/lib/libggml-cuda.so", "/usr/local/cuda/lib64/libcudart.so.13.0.96"]
    assert cuda_runtime_from_libraries(libs) == "13.0"
    assert cuda_runtime_from_libraries(["/x/libcudart.so.12"]) == "12"
    assert cuda_runtime_from_libraries(libs[:2]) is None
    assert arch_of((6, 1)) == 610 and arch_of((12, 0)) == 1200


def test_list_devices_output() -> None:
    gpu = "Available devices:\n  CUDA0: NVIDIA H200 (143156 MiB, 142000 MiB free)\nmain: exiting\n"
    assert parse_list_devices(gpu) == ("CUDA0: NVIDIA H200 (143156 MiB, 142000 MiB free)",)
    assert parse_list_devices("Available devices:\n  (none)\n") == ()
    assert parse_list_devices("error: unknown argument\n") == ()


def test_this_machines_build_is_probed_for_real() -> None:
    build = probe_llama_build()
    assert build.importable and build.version == "0.3.36"
    assert "CPU" in build.backends
    if not build.supports_gpu_offload:
        assert build.cuda_archs == () and "CUDA" not in build.backends


def test_a_llama_server_binary_is_asked_for_its_devices(tmp_path: Path) -> None:
    """A stand-in binary prints what a CPU build of llama-server prints for --list-devices."""
    binary = tmp_path / "llama-server"
    binary.write_text('#!/bin/sh\n[ "$1" = --list-devices ] && printf "Available devices:\\n  (none)\\n"\n')
    binary.chmod(0o755)
    found = probe_llama_server(str(binary))
    assert found.error is None and found.devices == () and not found.has_cuda
    missing = probe_llama_server(str(tmp_path / "nope"))
    assert missing.error is not None


def test_llama_server_verdicts(machines: dict[str, HostSnapshot]) -> None:
    healthy = machines["healthy-p4"]

    def verdict(snapshot: HostSnapshot) -> str:
        return next(c.status for c in run_checks(snapshot) if c.name == "llama_server")

    assert verdict(healthy) == "pass"
    assert verdict(healthy.model_copy(update={"llama_server": None})) == "fail"  # the plan runs it
    cpu_build = LlamaServerBuild(path="/usr/bin/llama-server", devices=())
    assert verdict(healthy.model_copy(update={"llama_server": cpu_build})) == "fail"
    no_plan = healthy.model_copy(update={"plan": None, "llama_server": cpu_build})
    assert verdict(no_plan) == "warn"
