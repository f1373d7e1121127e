"""The tuned profile: the settings a tune found best, written where `edgeserve launch` reads them
(server.launch.profile.tuned_dir(): $EDGESERVE_TUNED_DIR, else $XDG_CONFIG_HOME/edgeserve/tuned), one file per
card named as the packaged profiles are. The launcher lays it between the card's packaged profile and the
EDGESERVE_* variables and CLI flags, and its `tuned_by` note becomes part of each setting's reason.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from quantize.atomic import atomic_path
from server.launch.profile import TUNED_BY, Profile, profile_file_name, tuned_dir


def tuned_note(date: str, goodput_rps: float, slo: str, model: str, backend: str) -> str:
    """The reason a plan gives for a tuned value: when the tune ran and what it measured."""
    return (f"from edgeserve tune on {date} (goodput {goodput_rps:.3g} req/s at {slo}; {backend}, "
            f"model {model})")


def write_tuned_profile(card_id: str, values: Mapping[str, Any], note: str,
                        directory: Path | None = None) -> Path:
    """Write (replace) the tuned profile of `card_id`; the values are checked as a profile first."""
    Profile.model_validate(dict(values))  # a value the launcher would refuse fails here, not at launch
    folder = directory or tuned_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / profile_file_name(card_id)
    header = ("# Written by `edgeserve tune`; `edgeserve launch` reads it for this card (CLI flags and\n"
              "# EDGESERVE_* variables still win). Delete the file to go back to the packaged profile.\n")
    body = yaml.safe_dump({"card": card_id, TUNED_BY: note, **dict(values)}, sort_keys=False)
    with atomic_path(path) as tmp:
        tmp.write_text(header + body, encoding="utf-8")
    return path
