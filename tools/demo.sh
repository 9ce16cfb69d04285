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
#    curves; re-running resumes, or returns at once when the run is finished;
# 5. fine-tunes it with CTC on the 10-minute labeled subset, trains the same architecture from scratch
#    with the same updates, evaluates both on the held-out test speakers and prints the WER/CER table
#    (tools/experiment_low_resource.py; DEMO_FT_UPDATES updates each, default 2000, both at once; ~12 min).
# 6. speaker ID on the 24 training speakers (closed set, a quarter of each speaker's utterances held
#    out): the SUPERB head on the frozen pretrained upstream, 400 updates (~2 min), then
#    'speechssl evaluate' prints its accuracy (and a cosine EER) on the held-out utterances.
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

step "1/7 demo corpus -> $CORPUS"
speechssl corpus "$CORPUS"

step "2/7 manifests -> $MANIFESTS"
# These manifests are derived from the corpus and rebuilt on every run (--force).
speechssl manifest "$CORPUS/train" --out "$MANIFESTS/unlabeled" \
    --add-split valid="$CORPUS/dev" --force --quiet
speechssl manifest "$CORPUS/train" --out "$MANIFESTS/labeled_10min" --train-seconds 600 \
    --add-split valid="$CORPUS/dev" --add-split test="$CORPUS/test" --require-transcripts --force --quiet

step "3/7 check manifests"
speechssl manifest --check "$MANIFESTS/unlabeled"
speechssl manifest --check "$MANIFESTS/labeled_10min"

RUNS=$DEMO/runs
step "4/7 pretrain wav2vec 2.0 (tiny recipe) -> $RUNS/wav2vec2_tiny"
speechssl pretrain recipes/wav2vec2_tiny.yaml task.data="$MANIFESTS/unlabeled" \
    checkpoint.save_dir="$RUNS/wav2vec2_tiny" common.log_format=simple

step "5/7 plots"
speechssl plot "$RUNS/wav2vec2_tiny"

step "6/7 CTC fine-tuning on 10 min of labels: pretrained vs from scratch -> $RUNS/demo_ctc"
python tools/experiment_low_resource.py --pretrained "wav2vec2=$RUNS/wav2vec2_tiny/checkpoint_best.pt" \
    --labeled "$MANIFESTS/labeled_10min" --work "$RUNS/demo_ctc" --updates "${DEMO_FT_UPDATES:-2000}" --parallel

step "7/7 speaker ID: frozen pretrained upstream + SUPERB head, 24 speakers -> $RUNS/speaker_id_demo"
# closed set: a quarter of every training speaker's utterances held out; checkpoint_last (no selection on valid)
speechssl manifest "$CORPUS/train" --out "$MANIFESTS/speaker_id" --split-by utterance --valid-percent 0.25 \
    --force --quiet
speechssl finetune recipes/speaker_id_frozen.yaml task.data="$MANIFESTS/speaker_id" \
    model.w2v_path="$RUNS/wav2vec2_tiny/checkpoint_best.pt" checkpoint.save_dir="$RUNS/speaker_id_demo" \
    optimization.max_update=400 common.log_format=simple
speechssl evaluate "$RUNS/speaker_id_demo/checkpoint_last.pt" "$MANIFESTS/speaker_id" --split valid \
    --out "$RUNS/speaker_id_demo/eval_valid" --eer-trials 2000 --force

printf '\nDone.\n  corpus:      %s\n  manifests:   %s/{unlabeled,labeled_10min}\n' "$CORPUS" "$MANIFESTS"
printf '  checkpoint:  %s\n  plots:       %s\n' "$RUNS/wav2vec2_tiny/checkpoint_last.pt" "$RUNS/wav2vec2_tiny/plots"
printf '  CTC runs:    %s (WER table: results.md)\n' "$RUNS/demo_ctc"
printf '  speaker ID:  %s (report.json, confusion_matrix.png)\n' "$RUNS/speaker_id_demo/eval_valid"
