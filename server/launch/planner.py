"""make_plan: the edge that gathers the facts (detected card, model file, profile, installed programs) and
hands them to the pure builders. Everything here that touches the machine is a read: NVML, /proc, the model
header, the configs directory, PATH.
"""

from __future__ import annotations

import re
from pathlib import Path

from quantize.gguf_model import GGUFReadError, read_model_spec
from quantize.levels import level_for_ftype, level_names
from quantize.model_spec import ModelSpec
from server.cards import GpuSet, UnknownCardError, get_card
from server.launch.context import BuildContext
from server.launch.plan import CPU_CARD, LaunchPlan, QuantFile
from server.launch.profiles import load_profile
from server.launch.registry import build_plan
from server.launch.request import LaunchRequest
from server.launch.resolve import PlanError
from server.launch.toolchain import Toolchain, probe_toolchain


def resolve_target(request: LaunchRequest) -> tuple[GpuSet | None, int | None]:
    """The GPUs to plan for (None = the CPU) and the host's RAM. `--card auto` detects; an id needs no GPU."""
    from server.detect import detect, detect_cpu, gpu_set_from_detection

    card_key = request.card.strip().lower()
    if card_key == CPU_CARD or request.gpus == 0:
        return None, detect_cpu().total_ram_bytes
    if card_key != "auto":
        try:
            card = get_card(request.card)
        except UnknownCardError as exc:
            raise PlanError(str(exc)) from None
        return GpuSet.of(card, request.gpus or 1), detect_cpu().total_ram_bytes
    det = detect()
    ram = det.cpu.total_ram_bytes
    found = gpu_set_from_detection(det)
    if found is None:
        if request.gpus:
            raise PlanError(
                f"--gpus {request.gpus} asked for but no GPU was found ({det.reason or 'no driver'})"
            )
        return None, ram
    if request.gpus is None:
        return found, ram
    if request.gpus > found.count:
        raise PlanError(f"--gpus {request.gpus} but only {found.count} matching {found.card.id} GPU(s) here")
    return found.model_copy(update={"count": request.gpus}), ram


def resolve_model(request: LaunchRequest) -> tuple[str, ModelSpec, int | None]:
    """The model path (default: the bundled SmolLM2), its ModelSpec and file size."""
    if request.model:
        path = Path(request.model).expanduser()
    else:
        from quantize.bundled import BundledModelMissingError, default_model_path

        try:
            path = default_model_path()
        except BundledModelMissingError as exc:
            raise PlanError(str(exc)) from None
    try:
        if path.is_dir():
            from quantize.hf_config import model_spec_from_hf_config

            return str(path), model_spec_from_hf_config(path), None
        spec = read_model_spec(path)
    except GGUFReadError as exc:
        raise PlanError(str(exc)) from None
    return str(path.resolve()), spec, path.stat().st_size


def quant_alternatives(model_path: str, spec: ModelSpec, size_bytes: int | None) -> tuple[QuantFile, ...]:
    """Smaller quantizations of the same model next to it: the file name with its level swapped for another
    (model-Q5_K_M.gguf -> model-Q4_K_M.gguf, ...), smallest last."""
    level = level_for_ftype(spec.file_type)
    path = Path(model_path)
    if level is None or size_bytes is None or not path.is_file():
        return ()
    pattern = re.compile(re.escape(level.name), re.IGNORECASE)
    if not pattern.search(path.name):
        return ()
    found = []
    for name in level_names():
        if name.upper() == level.name.upper():
            continue
        candidate = path.with_name(pattern.sub(name, path.name))
        if candidate.is_file() and candidate.stat().st_size < size_bytes:
            found.append(QuantFile(path=str(candidate), quant=name, size_bytes=candidate.stat().st_size))
    return tuple(sorted(found, key=lambda q: -q.size_bytes))


def make_plan(
    request: LaunchRequest,
    *,
    toolchain: Toolchain | None = None,
    configs_dir: Path | None = None,
    target: tuple[GpuSet | None, int | None] | None = None,
) -> LaunchPlan:
    """Detect (or take `--card`), read the model and profile, and build the plan. Raises PlanError."""
    gpu_set, ram = target if target is not None else resolve_target(request)
    model_path, spec, size = resolve_model(request)
    resolved = load_profile(
        gpu_set.card.id if gpu_set else None, request.profile_overrides(), configs_dir=configs_dir
    )
    ctx = BuildContext(
        target=gpu_set,
        spec=spec,
        model_path=model_path,
        profile=resolved,
        request=request,
        toolchain=toolchain or probe_toolchain(),
        alternatives=quant_alternatives(model_path, spec, size),
        model_bytes=size,
        host_ram_bytes=ram,
    )
    return build_plan(ctx)
