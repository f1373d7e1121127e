"""edgeserve's serving side: cards, detection, launch plans, the engine, the gateway and the CLI."""

import contextlib

# llama.cpp's libraries are loaded before anything imports numpy: on a CUDA build of llama.cpp (CUDA 13,
# H100), a process that had imported numpy first segfaulted inside llama_model_load_from_file. Every edgeserve
# entry point imports this package (or `quantize`) first, so the order holds for all of them. The card tables
# and planners work without llama.cpp, hence the suppress.
with contextlib.suppress(ImportError):
    import llama_cpp  # noqa: F401
