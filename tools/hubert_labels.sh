#!/usr/bin/env bash
# HuBERT targets for one iteration: features -> k-means -> labels (fairseq's simple_kmeans recipe).
#
#   tools/hubert_labels.sh MANIFEST_DIR WORK_DIR          # iteration 1: 39-d MFCC, K=100, 100 labels/s
#   tools/hubert_labels.sh MANIFEST_DIR WORK_DIR CKPT     # iteration 2: layer 6 of CKPT, K=500, 50 labels/s
#
# Writes, with ITER = it1 (no CKPT) or it2:
#   WORK_DIR/ITER/features/   sharded features of every split of MANIFEST_DIR (train, valid, ...)
#   WORK_DIR/ITER/km.pt       k-means fit on PERCENT% of the train utterances
#   WORK_DIR/ITER/labels/     <split>.km for every split + dict.km.txt: point task.label_dir here
#
# Environment: K (100 / 500), LAYER (6), PERCENT (10), NSHARD (feature shards run in parallel, 1),
#   WORKERS (audio-reading processes per shard, 2), DEVICE (auto), SPLITS (default: every <split>.tsv),
#   SPEECHSSL (the command; default: this checkout's .venv), FORCE=1 (redo everything),
#   CMVN=1 (iteration 1: standardize each utterance's MFCCs; not in fairseq, see speechssl features mfcc --help).
# Every step resumes: finished feature shards, an existing km.pt and existing label files are kept
# unless FORCE=1.
set -euo pipefail

if [[ $# -lt 2 || $# -gt 3 ]]; then
  sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
MANIFEST=$1
WORK=$2
CKPT=${3:-}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ -z "${SPEECHSSL:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then SPEECHSSL="$ROOT/.venv/bin/python -m speechssl"; else SPEECHSSL=speechssl; fi
fi
PERCENT=${PERCENT:-10}
NSHARD=${NSHARD:-1}
WORKERS=${WORKERS:-2}
DEVICE=${DEVICE:-auto}
FORCE_FLAG=()
[[ "${FORCE:-0}" == 1 ]] && FORCE_FLAG=(--force)

if [[ -z "$CKPT" ]]; then
  ITER=it1; K=${K:-100}; KIND=(mfcc)
  [[ "${CMVN:-0}" == 1 ]] && KIND+=(--cmvn)
else
  [[ -f "$CKPT" ]] || { echo "hubert_labels: checkpoint not found: $CKPT" >&2; exit 2; }
  ITER=it2; K=${K:-500}; KIND=(layer --ckpt "$CKPT" --layer "${LAYER:-6}" --device "$DEVICE")
fi
[[ -f "$MANIFEST/train.tsv" ]] || { echo "hubert_labels: $MANIFEST/train.tsv not found" >&2; exit 2; }
if [[ -z "${SPLITS:-}" ]]; then
  SPLITS=$(cd "$MANIFEST" && ls *.tsv | grep -v '^skipped\.tsv$' | sed 's/\.tsv$//' | tr '\n' ' ')
fi
OUT=$WORK/$ITER
FEATS=$OUT/features
LABELS=$OUT/labels
mkdir -p "$FEATS" "$LABELS"

echo "== $ITER: features (${KIND[0]}) of: $SPLITS"
for split in $SPLITS; do
  pids=()
  for ((i = 0; i < NSHARD; i++)); do
    $SPEECHSSL features "${KIND[@]}" "$MANIFEST" --split "$split" --out "$FEATS" --nshard "$NSHARD" \
      --shard "$i" --num-workers "$WORKERS" "${FORCE_FLAG[@]}" &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid"; done  # set -e: a failed shard stops the script
done

echo "== $ITER: k-means, K=$K on $PERCENT% of train"
if [[ -f "$OUT/km.pt" && "${FORCE:-0}" != 1 ]]; then
  echo "$OUT/km.pt exists: kept (FORCE=1 refits)"
else
  $SPEECHSSL kmeans "$FEATS" --split train --k "$K" --sample-percent "$PERCENT" --device "$DEVICE" \
    --out "$OUT/km.pt" "${FORCE_FLAG[@]}"
fi

echo "== $ITER: labels"
for split in $SPLITS; do
  if [[ -f "$LABELS/$split.km" && "${FORCE:-0}" != 1 ]]; then
    echo "$LABELS/$split.km exists: kept (FORCE=1 relabels)"
    continue
  fi
  $SPEECHSSL label "$MANIFEST" --split "$split" --features "$FEATS" --km "$OUT/km.pt" --out "$LABELS" \
    --device "$DEVICE" "${FORCE_FLAG[@]}"
done

RATE=$(grep -o '"rate": [0-9.]*' "$FEATS/train_0_$NSHARD.json" | awk '{print $2 + 0}')
echo "== done. Pretrain HuBERT on these targets with:"
echo "   task.data=$MANIFEST task.labels=[km] task.label_dir=$LABELS task.label_rate=$RATE"
