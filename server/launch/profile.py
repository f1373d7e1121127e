"""Per-card launch profiles, with the tuned profile, EDGESERVE_* variables and CLI flags over them.

The packaged profiles are `profiles/<card id, - as _>.yaml` beside this module; a card's tuned profile is the
file `edgeserve tune` saved in `tuned_dir()`.

Precedence, highest first: CLI flag > EDGESERVE_<KEY> environment variable > the card's tuned profile (what
`edgeserve tune` measured best on this machine, `tuned_dir()`) > the card's YAML > the default here.
`ResolvedProfile.sources` records which of those gave each value, so a plan can say where a setting came
from. Keys are edgeserve's setting names (llama.cpp's: n_ctx, n_parallel, n_batch, kv_type, ...), the same as
the plan's and the engine's fields; a YAML key that is not a field is an error naming the file, so a misspelt
setting never goes silently unused. The profiles are package data (importlib.resources), so an installed
edgeserve has them too. Keys of earlier versions are read as their new names with a deprecation warning.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic_settings import BaseSettings, EnvSettingsSource, SettingsConfigDict

from server.engine.config import NCtx
from server.hardware.target import CPU_ID
from server.launch.plan import FlashAttn, Source

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

log = logging.getLogger(__name__)

ENV_PREFIX = "EDGESERVE_"
PROFILES = "profiles"
# Where `edgeserve tune` writes the settings it found best for a card; the file's `tuned_by` key says when and
# with what result, and becomes part of the plan's reasons.
TUNED_DIR_ENV = "EDGESERVE_TUNED_DIR"
TUNED_BY = "tuned_by"
# The command that removes a card's tuned profile: a plan that uses one says how to undo it.
FORGET_TUNED = "edgeserve tune forget"

BackendChoice = Literal["auto", "sglang", "llama-server", "embedded"]

# Keys of earlier versions (vLLM/SGLang spellings) -> edgeserve's names. Read with a deprecation warning, in a
# file or as EDGESERVE_<OLD KEY>; `context` was per sequence then too.
DEPRECATED_KEYS: dict[str, str] = {
    "context": "n_ctx",
    "max_num_seqs": "n_parallel",
    "kv_cache_dtype": "kv_type",
    "max_num_batched_tokens": "n_batch",
    "ubatch_size": "n_ubatch",
    "threads": "n_threads",
    "mem_fraction_static": "mem_fraction",
    "enable_prefix_caching": "prefix_cache",
    "data_parallel_size": "dp_size",
}


class ProfileError(ValueError):
    """A profile file is missing, not YAML, or has unknown keys or bad values; the message names the file."""


def default_profiles_dir() -> Traversable:
    """The profiles shipped with edgeserve (package data)."""
    return resources.files(__package__).joinpath(PROFILES)


def profile_file_name(card_id: str) -> str:
    """`tesla-p4` -> `tesla_p4.yaml` (the seed's file naming)."""
    return card_id.replace("-", "_") + ".yaml"


class Profile(BaseSettings):
    """Launch settings for one card. Values are per GPU; `n_ctx` is the context of one sequence."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="ignore")

    card: str | None = Field(
        default=None, description="card id the file describes (checked against its name)"
    )
    # Not `backend`: EDGESERVE_BACKEND is the gateway's (embedded | openai).
    preferred_backend: BackendChoice = Field(default="auto", description="backend `auto` picks on this card")
    gpu_memory_utilization: float = Field(
        default=0.90, gt=0.1, le=0.99, description="share of each GPU's memory the backend may use in all"
    )
    mem_fraction: float | None = Field(
        default=None,
        gt=0.1,
        le=0.99,
        description="SGLang --mem-fraction-static: weights + KV pool share; None = derived from the budget",
    )
    n_parallel: int = Field(default=4, ge=1, le=4096, description="sequences decoded at once")
    n_ctx: NCtx = 4096
    kv_type: str = Field(default="auto", description="auto | f16 | q8_0 | q4_0 | fp8_e4m3 | fp8_e5m2 ...")
    enable_chunked_prefill: bool = True
    n_batch: int = Field(default=2048, ge=32, description="-b (llama.cpp) / prefill chunk (SGLang)")
    n_ubatch: int = Field(default=512, ge=32, description="llama.cpp physical batch -ub")
    flash_attn: FlashAttn = "on"
    n_gpu_layers: int = Field(default=-1, ge=-1, description="-1 = all layers on the GPU")
    schedule_policy: str = "fcfs"
    prefix_cache: bool = Field(default=True, description="keep prompts' KV for reuse (SGLang: radix cache)")
    enforce_eager: bool = Field(default=False, description="SGLang: no CUDA graphs")
    kv_unified: bool | None = Field(
        default=None, description="llama.cpp: one KV pool shared by the sequences (default: on a GPU)"
    )
    enable_metrics: bool = True
    shutdown_grace_s: float = Field(
        default=30.0, ge=0, description="on SIGTERM, seconds for requests in flight before streams end"
    )
    backend_sampling: bool | None = Field(
        default=None, description="llama.cpp: sampling inside the decode graph (default: where faster)"
    )
    dp_size: int = Field(default=1, ge=1, description="SGLang: replicas; tp = gpus / dp")
    n_threads: int | None = Field(default=None, ge=1, description="CPU threads for layers on the CPU")


class ResolvedProfile(BaseModel):
    """A profile plus, for every field, where its value came from."""

    model_config = ConfigDict(frozen=True)

    profile: Profile
    sources: Mapping[str, Source]
    path: str | None = None
    tuned_path: str | None = None
    tuned_by: str | None = Field(default=None, description="the tuned profile's note: date and result")

    def source(self, field: str) -> Source:
        return self.sources.get(field, "default")

    def value(self, field: str) -> Any:
        return getattr(self.profile, field)


def renamed(values: Mapping[str, Any], where: str) -> dict[str, Any]:
    """`values` with deprecated keys under their new names (a warning names each); the new key wins."""
    out = dict(values)
    for old, new in DEPRECATED_KEYS.items():
        if old in out:
            log.warning("%s: %r is deprecated, use %r (same meaning)", where, old, new)
            value = out.pop(old)
            out.setdefault(new, value)
    return out


def read_profile_file(path: Path | Traversable, *, also: tuple[str, ...] = ()) -> dict[str, Any]:
    """The YAML mapping of a profile file, keys checked against Profile's fields and `also` (old keys
    renamed)."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ProfileError(f"{path}: cannot read profile ({exc.strerror})") from exc
    except yaml.YAMLError as exc:
        raise ProfileError(f"{path}: not valid YAML ({exc})") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ProfileError(f"{path}: a profile is a mapping of settings, got {type(data).__name__}")
    data = renamed(data, str(path))
    unknown = sorted(set(data) - set(Profile.model_fields) - set(also))
    if unknown:
        known = ", ".join((*Profile.model_fields, *also))
        raise ProfileError(f"{path}: unknown setting(s) {', '.join(unknown)}; known: {known}")
    return data


def tuned_dir() -> Path:
    """$EDGESERVE_TUNED_DIR, else $XDG_CONFIG_HOME/edgeserve/tuned (XDG's default: ~/.config)."""
    if os.environ.get(TUNED_DIR_ENV):
        return Path(os.environ[TUNED_DIR_ENV])
    config = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config) / "edgeserve" / "tuned"


def _tuned_values(name: str, directory: Path) -> tuple[dict[str, Any], str | None, str | None]:
    """The tuned profile of card `name`: its settings, its `tuned_by` note and its path (empty if none)."""
    path = directory / profile_file_name(name)
    if not path.is_file():
        return {}, None, None
    values = read_profile_file(path, also=(TUNED_BY,))
    note = str(values.pop(TUNED_BY, None) or "from edgeserve tune")
    if values.pop("card", name) != name:
        raise ProfileError(f"{path}: a tuned profile for another card than {name!r}")
    return values, note, str(path)


def _env_values() -> dict[str, Any]:
    """EDGESERVE_* values that name a profile field (or a deprecated key), parsed by pydantic-settings."""
    old = {f"{ENV_PREFIX}{k.upper()}": v for k, v in DEPRECATED_KEYS.items()}
    aliased = {name: os.environ[name] for name in old if name in os.environ}
    values = renamed({k[len(ENV_PREFIX) :].lower(): v for k, v in aliased.items()}, "environment")
    values.update(EnvSettingsSource(Profile)())
    return {k: v for k, v in values.items() if k in Profile.model_fields}


def load_profile(
    card_id: str,
    cli: Mapping[str, Any] | None = None,
    *,
    profiles_dir: Path | Traversable | None = None,
    use_env: bool = True,
    tuned: Path | None = None,
) -> ResolvedProfile:
    """The profile for `card_id` (the CPU target's id `cpu` for the CPU), its tuned profile (from `tuned`, a
    folder, default `tuned_dir()`, read only with `use_env`), env and CLI values laid over it.

    A card with no file gets the defaults (every source "default"); `cli` holds only flags the user gave.
    """
    directory = profiles_dir or default_profiles_dir()
    name = card_id or CPU_ID
    path = directory / profile_file_name(name)
    file_values = read_profile_file(path) if path.is_file() else {}
    if file_values.get("card") not in (None, name):
        raise ProfileError(f"{path}: says card {file_values['card']!r} but is the file for {name!r}")
    tuned_values, tuned_by, tuned_path = (
        _tuned_values(name, tuned or tuned_dir()) if use_env or tuned else ({}, None, None)
    )
    env_values = _env_values() if use_env else {}
    cli_values = {k: v for k, v in (cli or {}).items() if v is not None}
    unknown = sorted(set(cli_values) - set(Profile.model_fields))
    if unknown:
        raise ProfileError(f"unknown profile setting(s) from the command line: {', '.join(unknown)}")

    merged = {**file_values, **tuned_values, **env_values, **cli_values}
    try:
        # model_validate skips BaseSettings' own source reading: `merged` alone decides (cli > env > file).
        profile = Profile.model_validate(merged)
    except ValidationError as exc:
        where = str(path) if path.is_file() else f"profile {name!r}"
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise ProfileError(f"{where}: {problems}") from exc

    sources: dict[str, Source] = {}
    for field in Profile.model_fields:
        if field in cli_values:
            sources[field] = "cli"
        elif field in env_values:
            sources[field] = "env"
        elif field in tuned_values:
            sources[field] = "tuned"
        elif field in file_values:
            sources[field] = "profile"
        else:
            sources[field] = "default"
    return ResolvedProfile(profile=profile, sources=sources, path=str(path) if path.is_file() else None,
                           tuned_path=tuned_path, tuned_by=tuned_by)
