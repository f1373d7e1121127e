"""The tuned profile: a tune's winner, kept where `edgeserve launch` reads it, only when the user asks.

The file lives in server.launch.profile.tuned_dir() ($EDGESERVE_TUNED_DIR, else
$XDG_CONFIG_HOME/edgeserve/tuned), one per card, named as the packaged profiles are. The launcher lays it
between the card's packaged profile and the EDGESERVE_* variables and CLI flags, and its `tuned_by` note
becomes part of each setting's reason. `edgeserve tune run --save` and `edgeserve tune apply` write it,
`edgeserve tune forget` removes it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from loadtest.result import TuneResult
from quantize.atomic import atomic_path
from server.launch.profile import FORGET_TUNED, TUNED_BY, Profile, profile_file_name, tuned_dir


class NoWinnerError(ValueError):
    """A tune result with nothing chosen: there is no setting to keep (the message says why)."""


def tuned_profile_path(card_id: str, directory: Path | None = None) -> Path:
    """Where the tuned profile of `card_id` is (or would be): in `directory`, else tuned_dir()."""
    return (directory or tuned_dir()) / profile_file_name(card_id)


def tuned_note(date: str, goodput_rps: float, slo: str, model: str, backend: str) -> str:
    """The reason a plan gives for a tuned value: when the tune ran and what it measured."""
    return (f"from edgeserve tune on {date} (goodput {goodput_rps:.3g} req/s at {slo}; {backend}, "
            f"model {model})")


def write_tuned_profile(card_id: str, values: Mapping[str, Any], note: str,
                        directory: Path | None = None) -> Path:
    """Write (replace) the tuned profile of `card_id`; the values are checked as a profile first."""
    Profile.model_validate(dict(values))  # a value the launcher would refuse fails here, not at launch
    path = tuned_profile_path(card_id, directory)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = ("# Written by `edgeserve tune`; `edgeserve launch` reads it for this card (CLI flags and\n"
              f"# EDGESERVE_* variables still win). `{FORGET_TUNED} --card {card_id}` removes it, and the\n"
              "# packaged profile applies again.\n")
    body = yaml.safe_dump({"card": card_id, TUNED_BY: note, **dict(values)}, sort_keys=False)
    with atomic_path(path) as tmp:
        tmp.write_text(header + body, encoding="utf-8")
    return path


def save_winner(result: TuneResult, directory: Path | None = None) -> Path:
    """Write the winner of `result` as its card's tuned profile, with the tune's date and goodput as the
    note (the same from `run --save` and from `apply` later). Raises NoWinnerError when nothing was chosen."""
    values = result.winner_values()
    if values is None:
        raise NoWinnerError(f"the tune chose no setting, so there is nothing to keep: {result.choice.reason}")
    note = tuned_note(result.date, result.choice.goodput_rps, result.slo.describe(), result.model,
                      result.backend)
    return write_tuned_profile(result.card, {**values, "preferred_backend": result.backend}, note, directory)


def forget_tuned_profile(path: Path) -> bool:
    """Remove a tuned profile (tuned_profile_path's); False when there was none."""
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True
