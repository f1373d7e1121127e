"""Options the commands share, under one name each: the setting's own, with older spellings as aliases.

`--n-ctx` fills `n_ctx`, as the field of the profile, the plan and the engine; the short spellings existing
scripts use (`--ctx`, `--parallel`, `--threads`, ...) stay as second names of the same option.
"""

from __future__ import annotations

from typing import Any

import typer

# Second spellings of an option, kept so that scripts written for earlier versions keep working.
EXTRA_SPELLINGS: dict[str, tuple[str, ...]] = {
    "model_path": ("--model",),
    "n_ctx": ("--ctx",),
    "n_parallel": ("--parallel",),
    "n_threads": ("--threads",),
    "n_ubatch": ("--ubatch",),
}

N_CTX_HELP = "context of ONE sequence (prompt + completion), tokens; the KV pool is n_ctx x n_parallel"
N_PARALLEL_HELP = "sequences decoded at once (slots)"
KV_TYPE_HELP = "KV cache type: f16|q8_0|q4_0|... (llama.cpp), auto|fp8_e4m3|fp8_e5m2 (SGLang)"
FLASH_ATTN_HELP = "flash attention: on, off or auto (llama.cpp decides)"


def flag(name: str) -> str:
    """The option of a setting: `n_ctx` -> `--n-ctx`."""
    return "--" + name.replace("_", "-")


def option(name: str, help: str, *, is_bool: bool = False, **kwargs: Any) -> Any:
    """typer.Option for setting `name`: `--name` plus its extra spellings; a bool gets `--name/--no-name`."""
    names = (f"{flag(name)}/--no-{name.replace('_', '-')}",) if is_bool else (flag(name),)
    return typer.Option(*names, *EXTRA_SPELLINGS.get(name, ()), help=help, **kwargs)
