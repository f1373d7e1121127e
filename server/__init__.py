"""edgeserve's serving side: cards, detection, launch plans, the engine, the gateway and the CLI."""

import contextlib
import os

# llama.cpp's CPU backend runs its threads through OpenMP, whose threads spin while they wait at each of the
# hundreds of barriers of a step. Where anything else wants a core (the gateway's event loop, a neighbour),
# a spinning thread holds it from the one that is late, and a step takes a scheduler slice per barrier: a
# 2-thread decode on 2 cores went from 17 ms to 3 s a token. Waiting threads that sleep instead degrade
# gently (bench/cpu_threads.py, docs/BENCHMARKS.md). OpenMP reads this once, when llama.cpp loads below;
# OMP_WAIT_POLICY=ACTIVE in the environment keeps the spinning.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# llama.cpp's libraries are loaded before anything imports numpy: on a CUDA build of llama.cpp (CUDA 13,
# H100), a process that had imported numpy first segfaulted inside llama_model_load_from_file. Every edgeserve
# entry point imports this package (or `quantize`) first, so the order holds for all of them. The card tables
# and planners work without llama.cpp, hence the suppress.
with contextlib.suppress(ImportError):
    import llama_cpp  # noqa: F401
