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
# 4. pretrains the tiny wav2vec 2.0 recipe on the unlabeled audio (~10 min on 2 cores) and plots its
#    curves; re-running resumes, or returns at once when the run is finished.
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

step "1/5 demo corpus -> $CORPUS"
speechssl corpus "$CORPUS"

step "2/5 manifests -> $MANIFESTS"
# These manifests are derived from the corpus and rebuilt on every run (--force).
speechssl manifest "$CORPUS/train" --out "$MANIFESTS/unlabeled" \
    --add-split valid="$CORPUS/dev" --force --quiet
speechssl manifest "$CORPUS/train" --out "$MANIFESTS/labeled_10min" --train-seconds 600 \
    --add-split valid="$CORPUS/dev" --add-split test="$CORPUS/test" --require-transcripts --force --quiet

step "3/5 check manifests"
speechssl manifest --check "$MANIFESTS/unlabeled"
speechssl manifest --check "$MANIFESTS/labeled_10min"

RUNS=$DEMO/runs
step "4/5 pretrain wav2vec 2.0 (tiny recipe) -> $RUNS/wav2vec2_tiny"
speechssl pretrain recipes/wav2vec2_tiny.yaml task.data="$MANIFESTS/unlabeled" \
    checkpoint.save_dir="$RUNS/wav2vec2_tiny" common.log_format=simple

step "5/5 plots"
speechssl plot "$RUNS/wav2vec2_tiny"

printf '\nDone.\n  corpus:      %s\n  manifests:   %s/{unlabeled,labeled_10min}\n' "$CORPUS" "$MANIFESTS"
printf '  checkpoint:  %s\n  plots:       %s\n' "$RUNS/wav2vec2_tiny/checkpoint_last.pt" "$RUNS/wav2vec2_tiny/plots"
