#!/usr/bin/env bash
# Start edgeserve on this machine with the OpenAI gateway on port 8000.
#   1. set up .venv if needed (phase1_foundation/setup_env.sh runtime) and the CUDA environment (set_cuda_env.sh);
#   2. plan for the detected card (`edgeserve launch --dry-run`): SGLang where the card runs it, llama.cpp else;
#   3. no GPU (or the embedded engine chosen): the gateway itself serves on :8000 with the in-process engine and
#      the bundled model, under the supervisor;
#      a GPU with SGLang or llama-server: that backend on its own port on 127.0.0.1 (supervised: restarts, OOM
#      ladder), then `edgeserve serve --backend openai --upstream-url ...` in front of it on :8000.
# Arguments go to `edgeserve launch` (e.g. --model-path PATH --n-ctx 8192 --n-parallel 8 --backend llama-server;
# --n-ctx is the context of one sequence).
# Environment: EDGESERVE_HOST (default 127.0.0.1; set 0.0.0.0 to serve other machines), EDGESERVE_PORT (8000),
# EDGESERVE_BACKEND_PORT (the backend's port; default SGLang 30000, llama-server 8080), EDGESERVE_SKIP_SETUP=1
# (use .venv as it is).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

if [ "${EDGESERVE_SKIP_SETUP:-0}" != 1 ] || [ ! -x .venv/bin/python ]; then
  ./phase1_foundation/setup_env.sh runtime
fi
# shellcheck source=phase1_foundation/set_cuda_env.sh
. ./phase1_foundation/set_cuda_env.sh

py="$root/.venv/bin/python"
edgeserve=("$py" -m server.cli.app)
host="${EDGESERVE_HOST:-127.0.0.1}"
port="${EDGESERVE_PORT:-8000}"
run_dir="${XDG_RUNTIME_DIR:-/tmp}/edgeserve-$port"
mkdir -p "$run_dir"

plan_json="$("${edgeserve[@]}" launch --dry-run --json "$@")"
read -r backend n_parallel < <(printf '%s' "$plan_json" | "$py" -c \
  'import json, sys; p = json.load(sys.stdin); print(p["backend"], p["n_parallel"])')

if [ "$backend" = "embedded" ]; then
  echo "edgeserve: embedded engine on http://$host:$port (plan: ${run_dir}/plan.json)"
  printf '%s\n' "$plan_json" > "$run_dir/plan.json"
  exec "${edgeserve[@]}" launch --backend embedded --host "$host" --port "$port" \
    --status-file "$run_dir/status.json" "$@"
fi

backend_port_args=()
[ -n "${EDGESERVE_BACKEND_PORT:-}" ] && backend_port_args=(--port "$EDGESERVE_BACKEND_PORT")
plan_json="$("${edgeserve[@]}" launch --dry-run --json --host 127.0.0.1 "${backend_port_args[@]}" "$@")"
printf '%s\n' "$plan_json" > "$run_dir/plan.json"
backend_port="$(printf '%s' "$plan_json" | "$py" -c 'import json, sys; print(json.load(sys.stdin)["port"])')"
status="$run_dir/status.json"
rm -f "$status"

echo "edgeserve: $backend on 127.0.0.1:$backend_port, gateway on http://$host:$port"
"${edgeserve[@]}" launch --host 127.0.0.1 "${backend_port_args[@]}" --status-file "$status" "$@" &
launcher=$!
gateway=""
stop() {
  # The launcher stops its backend's whole process group on SIGTERM; the gateway holds no child processes.
  [ -n "$gateway" ] && kill -TERM "$gateway" 2>/dev/null
  kill -TERM "$launcher" 2>/dev/null
  wait "$launcher" 2>/dev/null
}
trap stop EXIT
trap 'exit 130' INT TERM

# Wait for the backend to become healthy (the supervisor writes "ready" once its health URL answers 200).
until [ -f "$status" ] && "$py" -c 'import json, sys; sys.exit(json.load(open(sys.argv[1]))["state"] != "ready")' \
    "$status" 2>/dev/null; do
  if ! kill -0 "$launcher" 2>/dev/null; then
    echo "edgeserve: the $backend launcher exited before its backend was ready (see $status)" >&2
    exit 1
  fi
  sleep 1
done

"${edgeserve[@]}" serve --backend openai --upstream-url "http://127.0.0.1:$backend_port" --host "$host" \
  --port "$port" --n-parallel "$n_parallel" &
gateway=$!
wait "$gateway"
