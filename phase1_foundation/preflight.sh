#!/usr/bin/env bash
# Checks before serving or benchmarking: `edgeserve doctor` (GPUs through NVML: idle, temperature, free memory
# against the plan, foreign processes, persistence, PCIe link, throttling, power limit, ECC, peer access and
# NCCL; the llama.cpp build, llama-server and SGLang; CPU, RAM, disk and ports). Without a GPU it says so and
# checks what still applies. Arguments go to `edgeserve doctor` (e.g. --json, --strict, --model-path M.gguf,
# --port 8000, --save-snapshot FILE). Exit status: 0 ready (warnings allowed), 1 a check failed, 2 bad arguments.
# EDGESERVE_PORT sets the gateway port (8000) checked unless --port is given.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
if [ ! -x .venv/bin/python ]; then
  ./phase1_foundation/setup_env.sh runtime >&2
fi
port_args=()
if [ -n "${EDGESERVE_PORT:-}" ] && [[ " $* " != *" --port "* ]]; then
  port_args=(--port "$EDGESERVE_PORT")
fi
exec .venv/bin/python -m server.cli.app doctor "${port_args[@]}" "$@"
