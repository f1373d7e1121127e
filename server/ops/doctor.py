"""`edgeserve doctor` as a pure function: a HostSnapshot in, a report of pass / warn / fail / skip out."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from server.ops.check import Check, DoctorLimits, Status, counts, exit_code
from server.ops.gpu_checks import gpu_checks
from server.ops.host_checks import host_checks
from server.ops.snapshot import HostSnapshot
from server.ops.software_checks import software_checks


class DoctorReport(BaseModel):
    """The checks in the order they are shown, their tally, and the exit code scripts read."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    taken_at: str
    is_cpu_only: bool
    checks: tuple[Check, ...]
    counts: dict[Status, int]
    exit_code: int


def run_checks(snapshot: HostSnapshot, limits: DoctorLimits | None = None) -> tuple[Check, ...]:
    limits = limits or DoctorLimits()
    return (*host_checks(snapshot, limits), *gpu_checks(snapshot, limits), *software_checks(snapshot))


def doctor(snapshot: HostSnapshot, limits: DoctorLimits | None = None, *,
           strict: bool = False) -> DoctorReport:
    """Judge a snapshot. Exit code 0 unless a check failed (or, with strict, warned)."""
    checks = run_checks(snapshot, limits)
    return DoctorReport(
        taken_at=snapshot.taken_at,
        is_cpu_only=snapshot.detection.is_cpu_only,
        checks=checks,
        counts=counts(checks),
        exit_code=exit_code(checks, strict=strict),
    )
