#!/usr/bin/env bash
# Make an offline bundle on a connected machine: everything setup needs (llama-cpp-python's sources, the bundled
# model, every dependency as wheels for the target, the build requirements; --with-test what run_tests.sh needs)
# in DIR, with a manifest of every file's sha256. A thin wrapper over `edgeserve bundle` (sets up .venv first).
# Usage: make_bundle.sh DIR [--python-version 3.12] [--platform manylinux_2_28_x86_64] [--with-test] [--split-mib 50]
# Then carry DIR (or DIR.parts) to the air-gapped machine and run EDGESERVE_BUNDLE=DIR ./start_sglang.sh there
# (README "Offline install").
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${EDGESERVE_VENV:-$root/.venv}"
if [ ! -x "$venv/bin/edgeserve" ]; then
  "$root/phase1_foundation/setup_env.sh" runtime
fi
exec "$venv/bin/edgeserve" bundle make "$@"
