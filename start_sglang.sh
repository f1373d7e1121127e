#!/usr/bin/env bash
# Start edgeserve here: the backend for the detected card (SGLang or llama.cpp; the embedded engine on the CPU)
# with the OpenAI gateway on port 8000. See phase1_foundation/start_sglang.sh for the details and options.
exec "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/phase1_foundation/start_sglang.sh" "$@"
