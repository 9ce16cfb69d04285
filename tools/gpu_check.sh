#!/usr/bin/env bash
# The GPU check of issue 16: one command, on one GPU, within 8 minutes (one H200), that writes
# gpu_report.md and gpu_report.json (+ gpu_check.log, tests_junit.xml) into --out and prints the report:
# the CUDA tests (tests/test_on_device.py on cuda), BASE wav2vec 2.0 / HuBERT training steps through
# speechssl's trainer beside transformers and torchaudio (bf16, 1.4M and 5.6M samples, with and without
# torch.compile), fp16 with the loss scaler, the data pipeline, k-means against scikit-learn.
#
#   bash tools/gpu_check.sh --prepare                 # here, with network: wheels the GPU machine lacks
#   bash tools/gpu_check.sh --out DIR                 # on the GPU machine (no network)
#   bash tools/gpu_check.sh --dry-run --out DIR       # anywhere: the same code paths on the CPU, tiny sizes
#   bash tools/gpu_check.sh --out DIR --sections steps,compile   # some sections only
#
# --prepare downloads Python 3.12 manylinux x86_64 wheels of the packages the GPU image lacks (soundfile,
# jiwer and their dependencies; versions of tools/requirements-lock.txt) into .gpu_wheels/, which git
# ignores: name it in the device tool's `carry` so that it travels with the tree. On the GPU machine they
# are installed into a temporary folder when the Python there cannot import them.
# Other options go to tools/gpu_check.py (--budget SECONDS). Python: $PYTHON, else .venv/bin/python, else python3.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

WHEELS_DIR=.gpu_wheels
# name==version; soundfile and jiwer as pinned in tools/requirements-lock.txt, their dependencies here
pinned() { sed -n "s/^$1==\(.*\)$/\1/p" tools/requirements-lock.txt; }
WHEELS=("soundfile==$(pinned soundfile)" "jiwer==$(pinned jiwer)" cffi==2.1.1 pycparser==3.12 rapidfuzz==3.14.6)

PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi

if [ "${1:-}" = "--prepare" ]; then
  rm -rf "$WHEELS_DIR"
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$WHEELS_DIR" "${WHEELS[@]}"
  echo "[gpu_check] $(ls "$WHEELS_DIR" | wc -l) wheels, $(du -sh "$WHEELS_DIR" | cut -f1) in $WHEELS_DIR:"
  ls "$WHEELS_DIR"
  exit 0
fi

export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE} PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -c "import soundfile, jiwer" 2>/dev/null; then
  if compgen -G "$WHEELS_DIR/*.whl" >/dev/null; then
    site=$(mktemp -d /tmp/gpu_check_site.XXXXXX)
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$WHEELS_DIR"/*.whl
    export PYTHONPATH="$PYTHONPATH:$site"
    echo "[gpu_check] installed $(ls "$WHEELS_DIR" | wc -l) wheels from $WHEELS_DIR into $site"
  else
    echo "[gpu_check] note: soundfile / jiwer missing and no $WHEELS_DIR (run 'bash tools/gpu_check.sh --prepare'" \
         "on a machine with network, and carry $WHEELS_DIR); sections that need them will fail" >&2
  fi
fi
exec "$PY" tools/gpu_check.py "$@"
