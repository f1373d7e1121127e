#!/usr/bin/env bash
# Seed 004's batch-size test, measured: the backend `edgeserve launch` plans for this card (SGLang
# --max-running-requests, llama-server -np, or the embedded engine's n_parallel) at n_parallel 1, 2, 4 and 8 in
# turn, each loaded with Locust (users matched to the slots, request rate bisected where the SLOs fail), and
# the "Batch Size Impact" table (throughput, latency, memory per n_parallel) in report.md
# (`edgeserve tune run --strategy grid`).
#
#   phase1_foundation/batch_test.sh [--model-path M.gguf] [--n-ctx 4096] [--duration 30] [--max-ttft-p95-ms 2000]
#                                   [--out DIR] [any other `edgeserve tune run` option]
#
# --n-ctx is the context of ONE sequence (the KV pool is n_ctx x n_parallel); --ctx and --parallel are accepted
# as before. Options given here override the defaults below (the last occurrence of an option wins), e.g.
# `--strategy search --n-ctx 4096,8192 --save` makes it a tune that keeps its winner as the card's tuned profile
# (nothing is kept without --save; `edgeserve tune apply DIR/results.json` keeps it later).
# Results land in DIR (default loadtest-results/batch-<time>): results.json, report.md and its PNGs, and per
# setting its plan, the server log and Locust's CSVs. Exit status 1 when no setting met the SLOs.
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
  --strategy grid \
  --n-parallel 1,2,4,8 \
  --n-ctx 4096 \
  --duration 30 \
  --out "loadtest-results/batch-$(date +%Y%m%d-%H%M%S)" \
  --title "edgeserve batch-size test (seed 004)" \
  "$@"
