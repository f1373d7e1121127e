"""Byte units, one home for the whole project: binary KiB/MiB/GiB (GPU datasheets' "GB" are GiB)."""

from __future__ import annotations

KIB = 1 << 10
MIB = 1 << 20
GIB = 1 << 30
