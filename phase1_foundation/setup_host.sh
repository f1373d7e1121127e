#!/usr/bin/env bash
# Prepares an NVIDIA host's GPUs for serving: `edgeserve host-setup`. By default it prints the exact nvidia-smi
# commands (persistence mode on where it is off; power limit, clocks and compute mode only when asked) and
# changes nothing; --apply runs them (root) and reports each result. Values outside what NVML allows for the card
# are refused with the range. Examples:
#   setup_host.sh                                   # what would change (persistence mode)
#   setup_host.sh --power-limit max --apply         # highest board power NVML allows, on every GPU
#   setup_host.sh --gpu 0 --lock-clocks 1500,2400   # repeatable benchmarks (Volta or newer); --reset-clocks undoes
#   setup_host.sh --compute-mode exclusive_process
# Exit status: 0 done, 1 an applied command failed, 2 refused or bad arguments, 3 no NVIDIA GPU, 4 not root.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
if [ ! -x .venv/bin/python ]; then
  ./phase1_foundation/setup_env.sh runtime >&2
fi
exec .venv/bin/python -m server.cli.app host-setup "$@"
