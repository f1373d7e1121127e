"""edgeserve's model side: GGUF inspection, quantization levels, the VRAM budget and the quantizer."""

import contextlib

# Load llama.cpp before numpy (see server/__init__.py: the reverse order crashed a CUDA build at model load).
with contextlib.suppress(ImportError):
    import llama_cpp  # noqa: F401
