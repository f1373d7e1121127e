"""One doctor check's verdict, the limits the checks apply, and what a list of verdicts means for a script."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict

Status = Literal["pass", "warn", "fail", "skip"]
STATUSES: tuple[Status, ...] = ("pass", "warn", "fail", "skip")

EXIT_OK = 0
EXIT_FAILED = 1


class Check(BaseModel):
    """A verdict: `name` is stable (scripts grep it), `detail` says what was seen, `hint` what to do."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    status: Status
    detail: str
    hint: str | None = None
    gpu: int | None = None


@dataclass(frozen=True)
class DoctorLimits:
    """Seed 000's pre-benchmark numbers: idle under 10% and 45 C; warn above 80 C, fail above 85 C."""

    idle_utilization_pct: int = 10
    idle_temperature_c: int = 45
    warn_temperature_c: int = 80
    fail_temperature_c: int = 85
    min_free_memory_pct: int = 90
    min_disk_gib: int = 20
    min_cpus: int = 2


def passed(name: str, detail: str, *, gpu: int | None = None) -> Check:
    return Check(name=name, status="pass", detail=detail, gpu=gpu)


def warned(name: str, detail: str, hint: str | None = None, *, gpu: int | None = None) -> Check:
    return Check(name=name, status="warn", detail=detail, hint=hint, gpu=gpu)


def failed(name: str, detail: str, hint: str | None = None, *, gpu: int | None = None) -> Check:
    return Check(name=name, status="fail", detail=detail, hint=hint, gpu=gpu)


def skipped(name: str, detail: str, *, gpu: int | None = None) -> Check:
    return Check(name=name, status="skip", detail=detail, gpu=gpu)


def counts(checks: Iterable[Check]) -> dict[Status, int]:
    out: dict[Status, int] = dict.fromkeys(STATUSES, 0)
    for check in checks:
        out[check.status] += 1
    return out


def exit_code(checks: Iterable[Check], *, strict: bool = False) -> int:
    """0 when nothing failed (warnings allowed unless strict), else 1."""
    bad = {"fail", "warn"} if strict else {"fail"}
    return EXIT_FAILED if any(c.status in bad for c in checks) else EXIT_OK
