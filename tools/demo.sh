#!/usr/bin/env bash
# The main job end to end on the embedded default corpus, on a fresh machine:
#   bash tools/demo.sh
# 1. installs everything (tools/setup.sh);
# 2. synthesizes the demo corpus (LibriSpeech layout, ~45 min, 30 speakers: 24 train, 3 dev, 3 test)
#    into $SPEECHSSL_DEMO_DIR/corpus (default ~/.cache/speechssl/demo/corpus); reused when already built;
# 3. builds its manifests under manifests/demo/:
#      unlabeled/      all training speakers' audio, for pretraining (valid = dev speakers)
#      labeled_10min/  a speaker-balanced 10-minute labeled subset, for fine-tuning
#                      (valid = dev speakers, test = held-out test speakers)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash tools/setup.sh
VENV=${SPEECHSSL_VENV:-.venv}
export PATH="$PWD/$VENV/bin:$PATH"
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
DEMO=${SPEECHSSL_DEMO_DIR:-$HOME/.cache/speechssl/demo}
CORPUS=$DEMO/corpus
MANIFESTS=manifests/demo
step() { printf '\n== %s\n' "$*"; }

step "1/3 demo corpus -> $CORPUS"
speechssl corpus "$CORPUS"

step "2/3 manifests -> $MANIFESTS"
# These manifests are derived from the corpus and rebuilt on every run (--force).
speechssl manifest "$CORPUS/train" --out "$MANIFESTS/unlabeled" \
    --add-split valid="$CORPUS/dev" --force --quiet
speechssl manifest "$CORPUS/train" --out "$MANIFESTS/labeled_10min" --train-seconds 600 \
    --add-split valid="$CORPUS/dev" --add-split test="$CORPUS/test" --require-transcripts --force --quiet

step "3/3 check manifests"
speechssl manifest --check "$MANIFESTS/unlabeled"
speechssl manifest --check "$MANIFESTS/labeled_10min"

printf '\nDone. Corpus: %s\nManifests: %s/{unlabeled,labeled_10min}\n' "$CORPUS" "$MANIFESTS"
