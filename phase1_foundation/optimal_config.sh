#!/usr/bin/env bash
# Print the launch plan edgeserve would use on this machine: the detected card, the backend, every setting with
# where it came from, the expected memory and the full command. Arguments go to `edgeserve launch`, e.g.
#   phase1_foundation/optimal_config.sh --model-path models/llama-8b-Q4_K_M.gguf --json
#   phase1_foundation/optimal_config.sh --card tesla-p4 --n-ctx 8192     # tokens of one sequence
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
if [ ! -x .venv/bin/python ]; then
  ./phase1_foundation/setup_env.sh runtime >&2
fi
exec .venv/bin/python -m server.cli.app launch --dry-run "$@"
