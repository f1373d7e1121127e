#!/usr/bin/env bash
# Start edgeserve on this machine with the OpenAI gateway on port 8000.
#   1. set up .venv if needed (phase1_foundation/setup_env.sh runtime: on a host with an NVIDIA driver and a CUDA
#      toolkit it builds llama.cpp with CUDA, llama-server included) and the CUDA environment (set_cuda_env.sh);
#   2. `edgeserve launch`: detect the card, plan (SGLang where the card runs it and it is installed, else
#      llama.cpp: the embedded engine or llama-server, whichever measured faster), check the plan against the
#      memory free now, and run it under the supervisor (restarts, OOM ladder) with edgeserve's gateway on :8000
#      (the embedded engine is the gateway; llama-server / SGLang get the gateway in front, on 127.0.0.1 only);
#   3. SIGTERM / Ctrl-C: the gateway drains (EDGESERVE_SHUTDOWN_GRACE_S, default 30 s, for requests in flight;
#      then their streams end with an error event and [DONE]), then the backend stops. Nothing is killed early.
# Arguments go to `edgeserve launch` (e.g. --model-path PATH --n-ctx 8192 --n-parallel 8 --backend llama-server;
# --n-ctx is the context of one sequence; --force starts a plan that does not fit the free memory).
# With --models FILE (a models file: server/gateway/models.example.yaml) the arguments go to `edgeserve serve`
# instead: several models behind the one port, each loaded when asked for and evicted by the memory plan (the
# gateway supervises llama-server models itself; SGLang stays one model per server).
# Environment: EDGESERVE_HOST (default 127.0.0.1; set 0.0.0.0 to serve other machines), EDGESERVE_PORT (8000),
# EDGESERVE_BACKEND_PORT (the backend's port behind the gateway; default SGLang 30000, llama-server 8080),
# EDGESERVE_SKIP_SETUP=1 (use .venv as it is), EDGESERVE_VENV (the environment; default .venv),
# EDGESERVE_BUNDLE=DIR (set up from an offline bundle, with no package index: README "Offline install").
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

venv="${EDGESERVE_VENV:-$root/.venv}"
if [ "${EDGESERVE_SKIP_SETUP:-0}" != 1 ] || [ ! -x "$venv/bin/python" ]; then
  ./phase1_foundation/setup_env.sh runtime
fi
# shellcheck source=phase1_foundation/set_cuda_env.sh
. ./phase1_foundation/set_cuda_env.sh

host="${EDGESERVE_HOST:-127.0.0.1}"
port="${EDGESERVE_PORT:-8000}"
run_dir="${XDG_RUNTIME_DIR:-/tmp}/edgeserve-$port"
mkdir -p "$run_dir"
extra=()
[ -n "${EDGESERVE_BACKEND_PORT:-}" ] && extra+=(--backend-port "$EDGESERVE_BACKEND_PORT")

for arg in "$@"; do
  case "$arg" in
    --models|--models=*|--models-file|--models-file=*)
      echo "edgeserve: serving the models file's models on http://$host:$port"
      exec "$venv/bin/python" -m server.cli.app serve --host "$host" --port "$port" "$@" ;;
  esac
done

echo "edgeserve: serving on http://$host:$port (status: $run_dir/status.json)"
# exec: the launcher gets the signals itself and stops its processes in order, draining the gateway first.
exec "$venv/bin/python" -m server.cli.app launch --host "$host" --port "$port" \
  --status-file "$run_dir/status.json" "${extra[@]}" "$@"
