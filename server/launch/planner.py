"""make_plan: the edge that gathers the facts and hands them to the pure builders.

The facts are the detected card, the model file, the profile and the installed programs. Everything here that
touches the machine is a read: NVML, /proc, the model header, the profiles, PATH.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from quantize.bundled import BundledModelMissingError, resolve_model_path
from quantize.model.gguf_file import GGUFReadError
from quantize.model.levels import level_for_ftype, level_names
from quantize.model.reader import read_spec
from quantize.model.spec import ModelSpec
from server.hardware.target import Target, resolve_target
from server.launch.context import BuildContext
from server.launch.plan import LaunchPlan, QuantFile
from server.launch.profile import load_profile
from server.launch.registry import build_plan
from server.launch.request import LaunchRequest
from server.launch.resolve import PlanError
from server.launch.toolchain import Toolchain, probe_toolchain

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable


def resolve_model(request: LaunchRequest) -> tuple[str, ModelSpec, int | None]:
    """The model path (default: the bundled SmolLM2), its ModelSpec and file size."""
    try:
        path = resolve_model_path(request.model_path)
        spec = read_spec(path)
    except (BundledModelMissingError, GGUFReadError) as exc:
        raise PlanError(str(exc)) from None
    if path.is_dir():
        return str(path), spec, None
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
    profiles_dir: Path | Traversable | None = None,
    target: Target | None = None,
) -> LaunchPlan:
    """Detect (or take `--card`), read the model and profile, and build the plan. Raises PlanError."""
    if target is None:
        try:
            target = resolve_target(request.card, request.gpus)
        except ValueError as exc:  # an unknown card, or GPUs asked for that are not here
            raise PlanError(str(exc)) from None
    model_path, spec, size = resolve_model(request)
    resolved = load_profile(target.card_id, request.profile_overrides(), profiles_dir=profiles_dir)
    ctx = BuildContext(
        target=target,
        spec=spec,
        model_path=model_path,
        profile=resolved,
        request=request,
        toolchain=toolchain or probe_toolchain(),
        alternatives=quant_alternatives(model_path, spec, size),
        model_bytes=size,
    )
    return build_plan(ctx)
