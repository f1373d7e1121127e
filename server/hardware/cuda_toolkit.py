"""Which CUDA toolkits can build llama.cpp's kernels for a card: a rule on its compute capability.

nvcc compiles native code (cubin) for an SM only from the toolkit that introduced it, and drops old SMs in a
major release. llama.cpp and llama-cpp-python are built from source or shipped as wheels for a list of SMs,
so a card needs a toolkit inside this range for its build; the driver only has to be new enough to run it.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

# CUDA 13.0 removed offline compilation and library support for compute capability below 7.5 (Maxwell,
# Pascal, Volta: sm_50 to sm_72): 12.x is the last major that builds for them. So a P4, P40, P100 or V100
# needs a CUDA 12.x llama.cpp (llama.cpp issue 25909; llama-cpp-python's CUDA 13 wheels are sm_75+).
CUDA13_DROPPED_BELOW_CC = (7, 5)
LAST_MAJOR_FOR_OLD_SMS = 12
CUDA13_DROP_SOURCES = (
    # NVIDIA's blog: "CUDA 13.0 ... removes offline compilation support for architectures before CC 7.5"
    # (the stored copy of the page read is the developer.nvidia.cn mirror of the same post).
    "https://developer.nvidia.cn/blog/navigating-gpu-architecture-support-a-guide-for-nvidia-cuda-developers",
    # cuFFT: "Starting from CUDA 13.0: Maxwell, Pascal, and Volta GPU architectures are no longer supported."
    "https://docs.nvidia.com/cuda/cufft/deprecated-functionality.html",
)

# The first toolkit that compiles native code for an architecture, newest first: (lowest CC, version, source).
# Each NVIDIA compatibility guide builds its architecture from that toolkit on ("Building Applications Using
# CUDA Toolkit 12.8", "... 11.8", "... 11.0"); sm_86 came one release after sm_80.
FIRST_TOOLKIT: tuple[tuple[tuple[int, int], tuple[int, int], str], ...] = (
    ((10, 0), (12, 8), "https://docs.nvidia.com/cuda/blackwell-compatibility-guide"),
    ((9, 0), (11, 8), "https://docs.nvidia.com/cuda/archive/12.0.0/pdf/Hopper_Compatibility_Guide.pdf"),
    ((8, 9), (11, 8), "https://docs.nvidia.com/cuda/ada-compatibility-guide"),
    ((8, 6), (11, 1), "https://discuss.pytorch.org/t/need-help-trouble-with-cuda-capability-sm-86/120235/6"),
    ((8, 0), (11, 0), "https://docs.nvidia.com/cuda/ampere-compatibility-guide"),
)


def _version(v: tuple[int, int]) -> str:
    return f"{v[0]}.{v[1]}"


class CudaToolkitRange(BaseModel):
    """The CUDA toolkits that can build llama.cpp for one compute capability.

    `min_version` None: every toolkit llama.cpp still builds with (11.x on) knows the SM. `max_major` None:
    the newest toolkits still build for it.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    compute_capability: tuple[int, int]
    min_version: tuple[int, int] | None = None
    max_major: int | None = None

    def allows(self, version: tuple[int, int]) -> bool:
        """Whether a toolkit of this (major, minor) version can build native code for the card."""
        if self.min_version is not None and version < self.min_version:
            return False
        return self.max_major is None or version[0] <= self.max_major

    @property
    def label(self) -> str:
        """Short form for tables: '12.8+', '11.8+', '12.x only', 'any'."""
        if self.max_major is not None:
            if self.min_version:
                return f"{_version(self.min_version)} to {self.max_major}.x"
            return f"{self.max_major}.x only"
        return f"{_version(self.min_version)}+" if self.min_version else "any"

    @property
    def reason(self) -> str:
        """Why, in a sentence naming the SM."""
        sm = f"sm_{self.compute_capability[0]}{self.compute_capability[1]}"
        if self.max_major is not None:
            return (
                f"CUDA {self.max_major + 1} no longer compiles for {sm}: build llama.cpp with a CUDA "
                f"{self.max_major}.x toolkit"
            )
        if self.min_version is not None:
            return f"{sm} needs CUDA {_version(self.min_version)} or newer to build llama.cpp"
        return f"every CUDA toolkit llama.cpp builds with compiles for {sm}"


def cuda_toolkit_for(cc: tuple[int, int]) -> CudaToolkitRange:
    """The toolkit range for a compute capability (see FIRST_TOOLKIT and CUDA13_DROPPED_BELOW_CC)."""
    first = next((version for low, version, _ in FIRST_TOOLKIT if cc >= low), None)
    last = LAST_MAJOR_FOR_OLD_SMS if cc < CUDA13_DROPPED_BELOW_CC else None
    return CudaToolkitRange(compute_capability=cc, min_version=first, max_major=last)
