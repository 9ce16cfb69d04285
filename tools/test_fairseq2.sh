#!/usr/bin/env bash
# fairseq2 interop tests (tests/test_interop_fairseq2.py against fairseq2 0.8.1 itself) in their own
# virtual environment: fairseq2 0.8.1 needs torch==2.9.1 exactly, which cannot share .venv (torch 2.11).
#   bash tools/test_fairseq2.sh [pytest args...]
# Builds .venv-fairseq2 (or $SPEECHSSL_FAIRSEQ2_VENV) once from tools/requirements-fairseq2.txt (about 2-3
# minutes and 7 GB: torch 2.9.1 with its CUDA libraries), then runs the tests on the CPU with
# TORCH_COMPILE_DISABLE=1. speechssl itself is used from this checkout (PYTHONPATH), not installed.
# If the environment cannot be built (no network, no disk), the tests are reported as skipped with the
# reason and the script exits 0; a failing test fails it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV=${SPEECHSSL_FAIRSEQ2_VENV:-.venv-fairseq2}
PYTHON=${PYTHON:-python3}
LOCK=tools/requirements-fairseq2.txt
stamp="$VENV/.speechssl-fairseq2-installed"
want="$(sha256sum "$LOCK" | cut -d' ' -f1)"

build() {
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -c "$LOCK" \
    torch==2.9.1 fairseq2==0.8.1 pytest PyYAML numpy
}

if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[fairseq2] building $VENV (torch 2.9.1 + fairseq2 0.8.1; takes a few minutes the first time)"
  start=$SECONDS
  if ! log=$(build 2>&1); then
    echo "$log" | tail -5
    echo "[fairseq2] SKIPPED tests/test_interop_fairseq2.py against fairseq2: could not build $VENV (see above)"
    exit 0
  fi
  echo "$want" > "$stamp"
  echo "[fairseq2] $VENV ready in $((SECONDS - start)) s"
fi
export TORCH_COMPILE_DISABLE=1 FAIRSEQ2_NO_PROGRESS=1 OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider \
  tests/test_interop_fairseq2.py "$@"
