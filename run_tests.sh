#!/usr/bin/env bash
# Sets up .venv (if needed) and runs the lint, type and test suites. Extra arguments go to pytest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$root"
./phase1_foundation/setup_env.sh test
.venv/bin/ruff check .
.venv/bin/mypy
exec .venv/bin/python -m pytest "$@"
