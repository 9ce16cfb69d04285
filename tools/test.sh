#!/usr/bin/env bash
# One command on a fresh machine: install everything, then run the test suite.
#   bash tools/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash tools/setup.sh
VENV=${SPEECHSSL_VENV:-.venv}
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
exec "$VENV/bin/python" -m pytest -q "$@"
