"""NVML-shaped machines for the doctor and host-setup tests (there is no GPU here): a healthy Tesla P4, a hot
RTX 4090, a throttled RTX 5090 pair without peer access, a GPU whose llama.cpp build cannot offload, and the
CPU with no GPU. Each is a HostSnapshot, what `edgeserve doctor --save-snapshot` writes on a real host."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import typer

from loadtest.servers import running, start_edgeserve, write_chain
from quantize.model.units import GIB, MIB
from server.gateway.metrics import GatewayMetrics
from server.hardware.cpu import CpuInfo
from server.hardware.detect import build_detection
from server.hardware.gpu_info import GpuInfo, GpuLink, GpuSample, ProcessInfo, SupportedClocks
from server.llama.build import LlamaBuild, LlamaServerBuild
from server.ops.snapshot import (
    DiskSpace,
    HostSnapshot,
    NcclInstall,
    PlannedUse,
    PortState,
    SglangInstall,
)

CPU = CpuInfo(model_name="AMD EPYC 7313P", logical_cpus=32, usable_cpus=32, physical_cores=16,
              total_ram_bytes=128 * GIB, available_ram_bytes=120 * GIB)

CUDA12_PASCAL_BUILD = LlamaBuild(
    importable=True, version="0.3.36", supports_gpu_offload=True, cuda_runtime="12.8",
    backends={"CUDA": {"ARCHS": "610,750,860,890", "USE_GRAPHS": "1"}, "CPU": {"AVX2": "1"}},
)
CUDA13_BUILD = LlamaBuild(
    importable=True, version="0.3.36", supports_gpu_offload=True, cuda_runtime="13.0",
    backends={"CUDA": {"ARCHS": "750,800,860,890,900,1000,1200", "USE_GRAPHS": "1"}, "CPU": {"AVX2": "1"}},
)
CPU_BUILD = LlamaBuild(importable=True, version="0.3.36", supports_gpu_offload=False,
                       backends={"CPU": {"AVX2": "1", "OPENMP": "1"}})


def tesla_p4(index: int = 0, **changes: Any) -> GpuInfo:
    """An idle, cool P4 with persistence on, as NVML reports one in a full x16 gen 3 slot."""
    gpu = GpuInfo(
        index=index, name="Tesla P4", uuid=f"GPU-p4-{index}", pci_bus_id=f"00000000:3B:0{index}.0",
        memory_total_bytes=7680 * MIB, memory_free_bytes=7600 * MIB, memory_used_bytes=80 * MIB,
        compute_capability=(6, 1), power_limit_w=75.0, power_default_limit_w=75.0, power_min_limit_w=60.0,
        power_max_limit_w=75.0, power_draw_w=6.5, temperature_c=34, utilization_gpu_pct=0,
        utilization_memory_pct=0, pcie_gen_current=1, pcie_gen_max=3, pcie_width_current=16,
        pcie_width_max=16, has_nvlink=None, persistence_mode=True, compute_mode="default",
        clock_reasons=("gpu_idle",), clock_sm_mhz=455, clock_sm_max_mhz=1531, clock_memory_max_mhz=3003,
        applications_clocks_mhz=(3003, 885), ecc_enabled=True, ecc_uncorrected_errors=0,
        supported_clocks=(SupportedClocks(memory_mhz=3003, graphics_mhz=(455, 885, 1063, 1531)),
                          SupportedClocks(memory_mhz=405, graphics_mhz=(455,))),
    )
    return gpu.model_copy(update=changes)


def rtx_4090_hot(index: int = 0) -> GpuInfo:
    """A busy 4090 at 88 C, clocks down for heat and power, a foreign process holding 20 GiB."""
    return GpuInfo(
        index=index, name="NVIDIA GeForce RTX 4090", memory_total_bytes=24564 * MIB,
        memory_free_bytes=3 * GIB, memory_used_bytes=24564 * MIB - 3 * GIB, compute_capability=(8, 9),
        power_limit_w=450.0, power_default_limit_w=450.0, power_min_limit_w=150.0, power_max_limit_w=600.0,
        power_draw_w=447.0, temperature_c=88, utilization_gpu_pct=97, pcie_gen_current=4, pcie_gen_max=4,
        pcie_width_current=16, pcie_width_max=16, persistence_mode=False, compute_mode="default",
        clock_reasons=("sw_power_cap", "sw_thermal_slowdown"), clock_sm_mhz=2100, clock_sm_max_mhz=3105,
        processes=(ProcessInfo(pid=4242, used_memory_bytes=20 * GIB, name="python3"),),
    )


def rtx_5090(index: int, **changes: Any) -> GpuInfo:
    gpu = GpuInfo(
        index=index, name="NVIDIA GeForce RTX 5090", memory_total_bytes=32607 * MIB,
        memory_free_bytes=32000 * MIB, memory_used_bytes=607 * MIB, compute_capability=(12, 0),
        power_limit_w=575.0, power_default_limit_w=575.0, power_min_limit_w=400.0, power_max_limit_w=600.0,
        power_draw_w=30.0, temperature_c=38, utilization_gpu_pct=0, pcie_gen_current=5, pcie_gen_max=5,
        pcie_width_current=16, pcie_width_max=16, persistence_mode=True, compute_mode="default",
        clock_reasons=("gpu_idle",), clock_sm_mhz=240, clock_sm_max_mhz=3090,
    )
    return gpu.model_copy(update=changes)


def throttled_5090_pair() -> tuple[GpuInfo, GpuInfo]:
    """The second card sits in an x8 slot and slows itself down (hardware slowdown)."""
    return rtx_5090(0), rtx_5090(1, pcie_width_current=8, clock_reasons=("hw_slowdown",),
                                 utilization_gpu_pct=55, temperature_c=71)


def make_snapshot(
    gpus: tuple[GpuInfo, ...] = (),
    *,
    links: tuple[GpuLink, ...] = (),
    build: LlamaBuild = CPU_BUILD,
    llama_server: LlamaServerBuild | None = None,
    plan: PlannedUse | None = None,
    sglang: SglangInstall | None = None,
    nccl: NcclInstall | None = None,
    ports: tuple[PortState, ...] = (),
    cuda_version: str | None = "12.8",
    cpu: CpuInfo = CPU,
) -> HostSnapshot:
    detection = build_detection(
        gpus, cpu, links=links, driver_version="570.133.20" if gpus else None,
        cuda_version=cuda_version if gpus else None,
        reason=None if gpus else "NVML unavailable: NVML Shared Library Not Found (no NVIDIA driver or GPU)",
    )
    return HostSnapshot(
        taken_at="2026-11-29T12:00:00+00:00",
        detection=detection,
        llama_build=build,
        llama_server=llama_server,
        sglang=sglang or SglangInstall(installed=False),
        nccl=nccl,
        disk=DiskSpace(path="/var/lib/edgeserve/models", free_bytes=200 * GIB, total_bytes=1000 * GIB),
        ports=ports or (PortState(host="127.0.0.1", port=8000, role="gateway", in_use=False),),
        plan=plan,
    )


@pytest.fixture(scope="session")
def machines() -> dict[str, HostSnapshot]:
    """The named machines the doctor and host-setup tests judge."""
    pair = throttled_5090_pair()
    return {
        "healthy-p4": make_snapshot(
            (tesla_p4(),), build=CUDA12_PASCAL_BUILD,
            llama_server=LlamaServerBuild(path="/run/current-system/sw/bin/llama-server",
                                          devices=("CUDA0: Tesla P4 (7680 MiB, 7600 MiB free)",)),
            plan=PlannedUse(backend="llama-server", card="tesla-p4", gpus=1, n_ctx=4096, n_parallel=4,
                            model_path="/models/llama-3.1-8b-q4_k_m.gguf", model_bytes=int(4.58 * GIB),
                            expected_bytes=int(6.9 * GIB), port=8080),
            ports=(PortState(host="127.0.0.1", port=8000, role="gateway", in_use=False),
                   PortState(host="127.0.0.1", port=8080, role="backend", in_use=False)),
        ),
        "hot-4090": make_snapshot((rtx_4090_hot(),), build=CUDA13_BUILD, cuda_version="13.0",
                                  plan=PlannedUse(backend="sglang", card="rtx-4090", gpus=1,
                                                  expected_bytes=20 * GIB, port=30000),
                                  sglang=SglangInstall(installed=True, version="0.5.23",
                                                       torch_version="2.14.1", torch_cuda="12.8",
                                                       cuda_available=True)),
        "throttled-5090-pair": make_snapshot(
            pair, build=CUDA13_BUILD, cuda_version="13.0",
            links=(GpuLink(a=0, b=1, topology="system", p2p_read="not_supported"),),
            nccl=NcclInstall(error="no CUDA torch with NCCL and no libnccl on the library path"),
        ),
        "p4-without-offload": make_snapshot((tesla_p4(),), build=CPU_BUILD),
        "p4-with-cuda13": make_snapshot((tesla_p4(),), build=CUDA13_BUILD, cuda_version="13.0"),
        "cpu": make_snapshot(plan=PlannedUse(backend="embedded", card="cpu", gpus=0, n_ctx=2048, n_parallel=4,
                                             expected_bytes=GIB // 2, model_bytes=98 * MIB)),
    }


@pytest.fixture(scope="session")
def command_app() -> Callable[[Callable[[typer.Typer], None]], typer.Typer]:
    """command_app(module.register) -> a typer app in group mode (as the real one) with that command."""

    def make(register: Callable[[typer.Typer], None]) -> typer.Typer:
        app = typer.Typer()

        @app.callback()
        def _root() -> None:
            """Group mode, as in the real app."""

        register(app)
        return app

    return make


@pytest.fixture()
def snapshot_file(tmp_path: Any, machines: dict[str, HostSnapshot]) -> Callable[[str], str]:
    """snapshot_file(name) -> the path of that machine's snapshot as JSON (what --snapshot reads)."""

    def write(name: str) -> str:
        path = tmp_path / f"{name}.json"
        path.write_text(machines[name].model_dump_json(indent=2))
        return str(path)

    return write


# --- a real gateway's /metrics, for the Prometheus rules and the Grafana dashboard ----------------------


def exposed_names(text: str) -> set[str]:
    """Every sample name a /metrics page can carry, including families that have no sample yet."""
    names: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            names.add(name)
            if kind == "histogram":
                names.update({f"{name}_bucket", f"{name}_sum", f"{name}_count"})
            if kind == "counter" and not name.endswith("_total"):
                names.add(f"{name}_total")
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


@pytest.fixture(scope="session")
def gateway_metric_names(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    """The metric names a running gateway exports: a real `edgeserve serve` (the bundled model, one thread)
    behind a one-member fallback chain, so the chain's own families (fallbacks, breakers) are there too,
    after a streamed and a plain chat completion. GPU gauges need a GPU: they come from the gateway's own
    collector (server/gateway/metrics.py) fed one NVML-shaped sample."""
    tmp = tmp_path_factory.mktemp("gateway-metrics")
    chain = write_chain(tmp / "chain.yaml", [
        {"name": "cpu", "kind": "embedded", "n_threads": 1, "n_ctx": 512, "n_parallel": 2}])
    server = start_edgeserve(["--chain-config", str(chain)], tmp / "serve.log",
                             env={"EDGESERVE_ENABLE_GPU_METRICS": "false"})
    with running(server.wait_ready()):
        body = {"model": "smollm2", "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4}
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=body | {"stream": True},
                          timeout=120) as resp:
            assert resp.status_code == 200
            assert any("[DONE]" in line for line in resp.iter_lines())
        assert httpx.post(server.url + "/v1/chat/completions", json=body, timeout=120).status_code == 200
        page = httpx.get(server.url + "/metrics", timeout=30).text
    gpu = GatewayMetrics(gpu_sampler=lambda: [GpuSample(
        index=0, name="Tesla P4", memory_used_bytes=GIB, memory_total_bytes=8 * GIB, utilization_gpu_pct=50,
        temperature_c=60, power_draw_w=40.0)])
    return exposed_names(page) | exposed_names(gpu.render().decode()) | exposed_names(_pool_page())


def _pool_page() -> str:
    """The model pool's families (a models file's gateway): its own collector and counters, bound to a
    registry as create_app binds them, one load and one eviction recorded."""
    from prometheus_client import CollectorRegistry, generate_latest

    from server.gateway.models.member import EmbeddedKind, Member
    from server.gateway.models.models_file import ModelsFile
    from server.gateway.models.pool import ModelPool

    models = ModelsFile.model_validate({"models": [{"name": "small"}]})
    pool = ModelPool(models, [Member(models.models[0], EmbeddedKind(), 300 * MIB)], budget_bytes=GIB)
    registry = CollectorRegistry()
    pool.bind_registry(registry)
    pool.metrics.loaded("small", 2.0)
    pool.metrics.evicted("small", "lru")
    pool.metrics.refused("small", "does_not_fit")
    return generate_latest(registry).decode()
