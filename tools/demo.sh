#!/usr/bin/env bash
# The main job end to end on the embedded default corpus, on a fresh machine:
#   bash tools/demo.sh
# 1. installs everything (tools/setup.sh);
# 2. synthesizes the demo corpus into $SPEECHSSL_DEMO_DIR/corpus (default ~/.cache/speechssl/demo/corpus;
#    reused when already built): an unlabeled pool of 5.5 h from 160 voices for pretraining, 24 labeled
#    training speakers, 3 dev and 3 test speakers never heard in pretraining or fine-tuning;
# 3. builds its manifests under manifests/demo/:
#      unlabeled/      the pool, for pretraining (valid = dev speakers)
#      labeled_10min/  a speaker-balanced 10-minute labeled subset of the training speakers
#                      (valid = dev speakers, test = held-out test speakers)
#      speaker_id/     the training speakers, split by recording session (train / valid / test sessions)
# 4. "does pretraining help?" (tools/experiment_pretraining.py, one seed, two jobs of one thread each):
#    pretrains data2vec 2.0 (recipes/data2vec2_tiny.yaml; DEMO_OBJECTIVE=wav2vec2 for wav2vec 2.0,
#    recipes/wav2vec2_mel_tiny.yaml) on the pool, about 10 minutes, with a frozen speaker-ID probe every 500
#    updates; beside it, the baselines that need no pretraining: CTC on the 10 labeled minutes from scratch
#    (the same architecture, read from the recipe) and the frozen FBANK and random-init probes; then CTC and
#    the frozen probes (ASR and speaker ID) of the pretrained model (every row fine-tuned as is best for it
#    on valid, see below), scored on the test speakers; prints the table (21 minutes in all with a fresh
#    corpus on 2 cores, measured);
# 5. plots the pretraining curves.
# DEMO_OBJECTIVE (data2vec2 | wav2vec2), DEMO_SEED (1), DEMO_CTC_UPDATES (the recipe's 1,500; masked runs
# twice as many) and DEMO_PROBE_UPDATES (ASR probe updates: 600 here to keep the demo short; the README's table
# uses speechssl probe's 1,500) change the run.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash tools/setup.sh
VENV=${SPEECHSSL_VENV:-.venv}
export PATH="$PWD/$VENV/bin:$PATH"
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
DEMO=${SPEECHSSL_DEMO_DIR:-$HOME/.cache/speechssl/demo}
CORPUS=$DEMO/corpus
MANIFESTS=manifests/demo
SEED=${DEMO_SEED:-1}
WORK=$DEMO/runs/demo
step() { printf '\n== %s   [%s]\n' "$*" "$(date +%H:%M:%S)"; }
SECONDS=0

step "1/5 demo corpus -> $CORPUS"
speechssl corpus "$CORPUS"

step "2/5 manifests -> $MANIFESTS"
# derived from the corpus and rebuilt on every run (--force)
speechssl manifest "$CORPUS/pool" --out "$MANIFESTS/unlabeled" --add-split valid="$CORPUS/dev" --force --quiet
speechssl manifest "$CORPUS/train" --out "$MANIFESTS/labeled_10min" --train-seconds 600 \
    --add-split valid="$CORPUS/dev" --add-split test="$CORPUS/test" --require-transcripts --force --quiet
speechssl manifest "$CORPUS/train" --out "$DEMO/manifests/train_all" --valid-percent 0 --force --quiet
python -c "import sys; from speechssl.tasks.speaker_id import make_cross_session_manifest as m; \
print('speaker_id:', m(sys.argv[1], sys.argv[2], force=True))" "$DEMO/manifests/train_all" "$MANIFESTS/speaker_id"

step "3/5 check manifests"
speechssl manifest --check "$MANIFESTS/unlabeled"
speechssl manifest --check "$MANIFESTS/labeled_10min"

OBJECTIVE=${DEMO_OBJECTIVE:-data2vec2}
case "$OBJECTIVE" in
  data2vec2) RECIPE=recipes/data2vec2_tiny.yaml ;;
  wav2vec2) RECIPE=recipes/wav2vec2_mel_tiny.yaml ;;
  *) echo "demo: DEMO_OBJECTIVE=$OBJECTIVE: choose data2vec2 or wav2vec2 (HuBERT: tools/experiment_pretraining.py)" >&2; exit 2 ;;
esac
RUN=$WORK/seed$SEED/$OBJECTIVE
step "4/5 does pretraining help? pretrain $OBJECTIVE ($RECIPE) on the unlabeled pool -> $RUN, beside it the baselines; then CTC on 10 labeled minutes and frozen probes (tools/experiment_pretraining.py)"
args=(--seeds "$SEED" --objectives "$OBJECTIVE" --jobs 2 --work "$WORK" --corpus "$CORPUS" --manifests "$MANIFESTS")
# the pretraining run probes speaker ID every 500 updates (plotted with its curves)
args+=(--override "$OBJECTIVE:probe.data=$MANIFESTS/speaker_id" --override "$OBJECTIVE:probe.interval_updates=500")
[[ -n "${DEMO_CTC_UPDATES:-}" ]] && args+=(--ctc-updates "$DEMO_CTC_UPDATES")
# every row is fine-tuned as is best for it on valid in the README's experiment ("Does pretraining help?"):
# from scratch, with time masking (mask_prob 0.5) over 3,000 updates (the recipe's unmasked 1,500 updates
# memorize the 98 utterances: valid CER 73.8 against 58.7 with masking, data2vec 2.0's architecture, seed 1);
# the data2vec 2.0 upstream without masking (with it, it stays near CTC's all-blank plateau: valid CER 83);
# the wav2vec 2.0 upstream with masking, like scratch, and at two learning rates, each row's best on valid (at
# 5e-4 it collapses onto the all-blank plateau)
MASKED=(model.apply_mask=true model.mask_prob=0.5 optimization.max_update=$((2 * ${DEMO_CTC_UPDATES:-1500})))
if [[ "$OBJECTIVE" == wav2vec2 ]]; then
  args+=(--ctc-lrs 5e-4,2e-4)
  for kv in "${MASKED[@]}"; do args+=(--ctc-override "$kv"); done
else
  for kv in "${MASKED[@]}"; do args+=(--ctc-override "scratch:$kv"); done
fi
args+=(--probe-updates "${DEMO_PROBE_UPDATES:-600}")
python tools/experiment_pretraining.py "${args[@]}"

step "5/5 plots"
speechssl plot "$RUN"

printf '\nDone in %d min.\n  corpus:      %s\n  manifests:   %s/{unlabeled,labeled_10min,speaker_id}\n' \
    $((SECONDS / 60)) "$CORPUS" "$MANIFESTS"
printf '  pretrained:  %s (plots: %s/plots)\n  table:       %s/results.md\n' "$RUN/checkpoint_last.pt" "$RUN" "$WORK"
