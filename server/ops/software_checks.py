"""Doctor checks of what runs on the GPUs: the llama.cpp build, llama-server and SGLang.

Pascal (CC 6.x) needs a llama.cpp built with a CUDA 12.x toolkit: CUDA 13 dropped sm_61 and older
(llama.cpp issue 25909). SGLang needs SM80+ and a CUDA build of torch (server/hardware/cards.py says why).
"""

from __future__ import annotations

from collections.abc import Iterator

from server.hardware.cards import SGLANG_MIN_CC
from server.hardware.gpu_info import GpuInfo
from server.llama.build import LlamaBuild, arch_of
from server.ops.check import Check, failed, passed, skipped, warned
from server.ops.snapshot import HostSnapshot

CUDA_REBUILD = "CMAKE_ARGS='-DGGML_CUDA=on' ./phase1_foundation/setup_env.sh"
PASCAL_CUDA = ("Pascal (CC 6.x) needs a llama.cpp built with a CUDA 12.x toolkit: CUDA 13 dropped sm_61 and "
               "older (llama.cpp issue 25909)")


def _cc(cc: tuple[int, int]) -> str:
    return f"{cc[0]}.{cc[1]}"


def _planned(snapshot: HostSnapshot) -> str | None:
    return snapshot.plan.backend if snapshot.plan is not None else None


def _distinct_cards(gpus: tuple[GpuInfo, ...]) -> list[GpuInfo]:
    """The first GPU of each compute capability: the build question is per architecture, not per card."""
    seen: dict[tuple[int, int], GpuInfo] = {}
    for gpu in gpus:
        if gpu.compute_capability is not None:
            seen.setdefault(gpu.compute_capability, gpu)
    return list(seen.values())


def llama_build(snapshot: HostSnapshot) -> Check:
    name, build, det = "llama_cpp.build", snapshot.llama_build, snapshot.detection
    if not build.importable:
        return failed(name, build.error or "llama-cpp-python does not import",
                      "./phase1_foundation/setup_env.sh")
    backends = ", ".join(build.backends) or "none reported"
    version = f"llama-cpp-python {build.version or '?'}"
    if det.is_cpu_only:
        return passed(name, f"{version}, ggml backends: {backends} (the CPU path)")
    if not build.supports_gpu_offload:
        return failed(name, f"{version} has no GPU offload (ggml backends: {backends}): the model would run "
                            "on the CPU", CUDA_REBUILD + " (a CUDA 12.x toolkit for Pascal)")
    archs = ",".join(str(a) for a in build.cuda_archs) or "?"
    return passed(name, f"{version} offloads to the GPU: ggml backends {backends}, CUDA archs {archs}, "
                        f"CUDA runtime {build.cuda_runtime or '?'}")


def llama_arch(gpu: GpuInfo, build: LlamaBuild) -> Check:
    """Can this build's CUDA kernels run on this card's architecture?"""
    name, cc = "llama_cpp.arch", gpu.compute_capability
    assert cc is not None
    card = f"{gpu.name} (CC {_cc(cc)})"
    if cc[0] == 6 and build.cuda_major is not None and build.cuda_major >= 13:
        return failed(name, f"{card}: this llama.cpp uses CUDA {build.cuda_runtime}. {PASCAL_CUDA}",
                      "install a CUDA 12.x toolkit, then " + CUDA_REBUILD, gpu=gpu.index)
    archs = build.cuda_archs
    if not archs:
        detail = f"{card}: the build does not list its CUDA architectures"
        if cc[0] == 6:
            detail += f". {PASCAL_CUDA}"
        return skipped(name, detail, gpu=gpu.index)
    own = arch_of(cc)
    listed = ",".join(str(a) for a in archs)
    if own in archs:
        return passed(name, f"{card}: kernels for sm_{own // 10} in the build ({listed})", gpu=gpu.index)
    lower = [a for a in archs if a < own]
    if lower:
        return warned(name, f"{card}: no sm_{own // 10} kernels in the build ({listed}); it runs only "
                            f"through PTX kept for sm_{max(lower) // 10} (compiled at start-up)",
                      f"rebuild for this card: CMAKE_ARGS='-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES="
                      f"{own // 10}' ./phase1_foundation/setup_env.sh", gpu=gpu.index)
    detail = f"{card}: the build has kernels for {listed} only, none this card can run"
    if cc[0] == 6:
        detail += f". {PASCAL_CUDA}"
    return failed(name, detail, f"rebuild with -DCMAKE_CUDA_ARCHITECTURES={own // 10}: " + CUDA_REBUILD,
                  gpu=gpu.index)


def llama_cuda_driver(snapshot: HostSnapshot) -> Check:
    """A CUDA runtime newer (by major version) than the driver supports does not start at all."""
    name, build, det = "llama_cpp.cuda_driver", snapshot.llama_build, snapshot.detection
    if build.cuda_major is None or not det.cuda_version:
        return skipped(name, "the build's CUDA runtime or the driver's CUDA version is unknown")
    driver_major = int(det.cuda_version.split(".")[0])
    seen = f"build CUDA {build.cuda_runtime}, driver supports CUDA {det.cuda_version}"
    if build.cuda_major > driver_major:
        return failed(name, seen, f"install a driver for CUDA {build.cuda_major}, or build with CUDA "
                                  f"{driver_major}.x")
    return passed(name, seen)


def llama_server(snapshot: HostSnapshot) -> Check:
    name, server = "llama_server", snapshot.llama_server
    needed = _planned(snapshot) == "llama-server"
    verdict = failed if needed else warned
    if server is None:
        if needed:
            return failed(name, "no llama-server on PATH, and the plan runs it",
                          "install llama.cpp's llama-server (built with CUDA) or pick --backend embedded")
        return skipped(name, "no llama-server on PATH (only --backend llama-server needs it)")
    if server.error:
        return verdict(name, server.error)
    if snapshot.detection.is_cpu_only:
        return passed(name, f"{server.path} (the CPU path)")
    if not server.has_cuda:
        devices = ", ".join(server.devices) or "none"
        return verdict(name, f"{server.path} sees no CUDA device (a CPU build): {devices}",
                       "install a CUDA build of llama-server")
    return passed(name, f"{server.path}: {'; '.join(server.devices)}")


def sglang(snapshot: HostSnapshot) -> Check:
    name, det, install = "sglang", snapshot.detection, snapshot.sglang
    if det.is_cpu_only or det.card is None:
        return skipped(name, "no GPU: SGLang needs an SM80+ GPU")
    cc = det.card.compute_capability
    if cc < SGLANG_MIN_CC:
        return skipped(name, f"{det.card.name} is CC {_cc(cc)}: SGLang needs SM80+ (Ampere or newer); "
                             "llama.cpp serves this card")
    needed = _planned(snapshot) == "sglang"
    if not install.installed:
        return (failed if needed else warned)(
            name, "SGLang is not installed; this card could run it (llama.cpp serves meanwhile)",
            "pip install sglang (with a CUDA build of torch)")
    version = f"SGLang {install.version or '?'}, torch {install.torch_version or '?'}"
    if install.error:
        return failed(name, f"{version}: {install.error}")
    if install.torch_cuda is None:
        return failed(name, f"{version} is a CPU build of torch: SGLang cannot run",
                      "install a CUDA build of torch matching the driver")
    if install.cuda_available is False:
        return failed(name, f"{version} (CUDA {install.torch_cuda}) does not see the GPU",
                      "torch's CUDA is newer than the driver, or CUDA_VISIBLE_DEVICES hides the GPUs")
    return passed(name, f"{version} (CUDA {install.torch_cuda}) on CC {_cc(cc)}")


def software_checks(snapshot: HostSnapshot) -> Iterator[Check]:
    yield llama_build(snapshot)
    build = snapshot.llama_build
    if build.importable and build.supports_gpu_offload:
        for gpu in _distinct_cards(snapshot.detection.gpus):
            yield llama_arch(gpu, build)
        yield llama_cuda_driver(snapshot)
    yield llama_server(snapshot)
    yield sglang(snapshot)
