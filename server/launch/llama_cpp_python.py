"""llama-cpp-python's own OpenAI server (`python -m llama_cpp.server`), started with the engine's CPU guard.

Tests and benchmarks use it as the "remote llama.cpp" backend and as the baseline edgeserve is compared with.
One change, and only where it is needed: when the loaded llama.cpp has AMX kernels and the CPU lists AMX,
llama.cpp's CPU extra buffer types are switched off, as the engine does (some virtual machines list AMX tiles
they cannot run, and the first batched decode then dies of SIGILL). Usage: the same arguments as
`python -m llama_cpp.server`.
"""

from __future__ import annotations

import runpy

import llama_cpp.llama_cpp as lc

from server.llama.loader import default_extra_bufts


def main() -> None:
    """Run llama_cpp.server's command line in this process."""
    if not default_extra_bufts():
        stock = lc.llama_model_default_params

        def params() -> lc.llama_model_params:
            p = stock()
            p.use_extra_bufts = False
            return p

        lc.llama_model_default_params = params  # type: ignore[assignment]
    runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
