#!/usr/bin/env bash
# One command on a fresh machine: install everything, then run the test suite.
#   bash tools/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash tools/setup.sh
VENV=${SPEECHSSL_VENV:-.venv}
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
# fairseq2 interop tests in their own venv (fairseq2 0.8.1 pins torch 2.9.1); the full run only
[ $# -gt 0 ] || bash tools/test_fairseq2.sh
exec "$VENV/bin/python" -m pytest -q "$@"
