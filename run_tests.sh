#!/usr/bin/env bash
# Sets up .venv (if needed) and runs the lint, type and test suites. Extra arguments go to pytest.
# EDGESERVE_VENV: the environment (default .venv); EDGESERVE_BUNDLE=DIR: set it up from an offline bundle made
# with --with-test (README "Offline install").
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$root"
./phase1_foundation/setup_env.sh test
# promtool and nix-instantiate check the Prometheus rules and the NixOS module; their tests skip without them.
# Best effort: installed as root where apt-get exists (not from a bundle: no package index), and a failure
# only means those tests skip.
if [ "$(id -u)" = 0 ] && [ -z "${EDGESERVE_BUNDLE:-}" ] && command -v apt-get >/dev/null 2>&1 \
    && { ! command -v promtool >/dev/null 2>&1 || ! command -v nix-instantiate >/dev/null 2>&1; }; then
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      prometheus nix-bin; } >/dev/null 2>&1 || echo "edgeserve: could not install promtool/nix-instantiate; their tests skip"
fi
venv="${EDGESERVE_VENV:-.venv}"
"$venv/bin/ruff" check .
"$venv/bin/mypy"
exec "$venv/bin/python" -m pytest "$@"
