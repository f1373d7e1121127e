#!/usr/bin/env bash
# Quantize a GGUF with llama.cpp (through llama-cpp-python, no llama-quantize binary needed), verify the result
# and write a manifest beside it. Arguments go to `edgeserve quantize`, e.g.
#   phase1_foundation/quantize_model.sh models/llama-8b-F16.gguf --level auto --card tesla-p4 --n-ctx 4096
#   phase1_foundation/quantize_model.sh models/llama-8b-F16.gguf --level Q4_K_M --out models/llama-8b-Q4_K_M.gguf
#   phase1_foundation/quantize_model.sh models/llama-8b-F16.gguf --levels Q8_0,Q6_K,Q4_K_M --eval my-text.txt
# Sets up .venv (runtime) the first time.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ ! -x "$root/.venv/bin/edgeserve" ]; then
  "$root/phase1_foundation/setup_env.sh" runtime >&2
fi
exec "$root/.venv/bin/edgeserve" quantize "$@"
