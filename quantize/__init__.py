"""edgeserve's model side: GGUF inspection, quantization levels, the VRAM budget and the quantizer."""

import contextlib
import os

# OpenMP's waiting threads sleep rather than spin (see server/__init__.py); read when llama.cpp loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# Load llama.cpp before numpy (see server/__init__.py: the reverse order crashed a CUDA build at model load).
with contextlib.suppress(ImportError):
    import llama_cpp  # noqa: F401
