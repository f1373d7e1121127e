#!/usr/bin/env bash
# Batch-size test: serves the model at --n-parallel 1, 2, 4 and 8 in turn, loads each with Locust and reports
# throughput, TTFT p50/p95 and errors, then names the best setting (python -m loadtest.tuner run).
#
#   phase1_foundation/batch_test.sh [--model M.gguf] [--n-ctx 1024] [--duration 30] [--max-ttft-p95-ms 2000]
#                                   [--out DIR] [any other `python -m loadtest.tuner run` option]
#
# --n-ctx is the context of ONE sequence (the KV pool is n_ctx x n_parallel); --ctx and --parallel are accepted
# as before. Options given here override the defaults below (the last occurrence of an option wins). Results land in
# DIR (default loadtest-results/batch-<time>): results.json, report.md, report.png, and per setting the server
# log, Locust's CSVs and a /metrics snapshot. Exit status 1 when no setting met the constraint.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${EDGESERVE_PYTHON:-$root/.venv/bin/python}"
if [ ! -x "$python" ]; then
  echo "batch_test: $python not found; run phase1_foundation/setup_env.sh test first (or set EDGESERVE_PYTHON)" >&2
  exit 2
fi
if ! "$python" -c "import locust, matplotlib" >/dev/null 2>&1; then
  echo "batch_test: Locust and matplotlib are missing: pip install 'edgeserve[loadtest]'" >&2
  exit 2
fi
cd "$root"
exec "$python" -m loadtest.tuner run \
  --n-parallel 1,2,4,8 \
  --n-ctx 1024 \
  --duration 30 \
  --out "loadtest-results/batch-$(date +%Y%m%d-%H%M%S)" \
  --title "edgeserve batch-size test" \
  "$@"
