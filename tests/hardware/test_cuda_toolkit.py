"""The CUDA toolkit llama.cpp needs per compute capability: CUDA 12.x only below 7.5 (CUDA 13 dropped Maxwell,
Pascal and Volta), 12.8+ for Blackwell, 11.8+ for Ada and Hopper."""

from __future__ import annotations

import pytest

from server.hardware.cuda_toolkit import CUDA13_DROP_SOURCES, FIRST_TOOLKIT, cuda_toolkit_for


@pytest.mark.parametrize(
    ("cc", "label", "ok", "refused"),
    [
        ((6, 0), "12.x only", (11, 8), (13, 0)),
        ((6, 1), "12.x only", (12, 9), (13, 0)),
        ((7, 0), "12.x only", (12, 9), (13, 0)),
        ((7, 5), "any", (13, 0), None),  # sm_75 stays in CUDA 13
        ((8, 0), "11.0+", (11, 0), (10, 2)),
        ((8, 6), "11.1+", (13, 0), (11, 0)),
        ((8, 9), "11.8+", (11, 8), (11, 7)),
        ((9, 0), "11.8+", (12, 0), (11, 7)),
        ((12, 0), "12.8+", (12, 8), (12, 6)),
    ],
)
def test_toolkit_range_per_compute_capability(
    cc: tuple[int, int], label: str, ok: tuple[int, int], refused: tuple[int, int] | None
) -> None:
    toolkit = cuda_toolkit_for(cc)
    assert toolkit.label == label
    assert toolkit.allows(ok)
    if refused is not None:
        assert not toolkit.allows(refused)


def test_the_reason_names_the_sm() -> None:
    pascal = cuda_toolkit_for((6, 1)).reason
    assert "CUDA 12.x toolkit" in pascal and "sm_61" in pascal
    assert "12.8 or newer" in cuda_toolkit_for((12, 0)).reason
    assert cuda_toolkit_for((7, 2)).max_major == 12  # Xavier, Volta's Jetson
    assert cuda_toolkit_for((7, 5)).max_major is None


def test_the_rule_cites_nvidia() -> None:
    assert all(url.startswith("https://") for url in CUDA13_DROP_SOURCES)
    assert all(src.startswith("https://") for _, _, src in FIRST_TOOLKIT)
    # newest architecture first, so the first threshold a capability reaches is its own
    assert [low for low, _, _ in FIRST_TOOLKIT] == sorted((low for low, _, _ in FIRST_TOOLKIT), reverse=True)
