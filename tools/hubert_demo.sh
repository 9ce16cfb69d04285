#!/usr/bin/env bash
# HuBERT, both iterations end to end through the CLI, on the demo corpus (or any manifest directory):
#
#   bash tools/hubert_demo.sh [MANIFEST_DIR [WORK_DIR]]
#
#   1. iteration-1 targets: 39-d MFCC with per-utterance CMVN -> k-means (K1=100) -> <split>.km at 100 labels/s
#      (tools/hubert_labels.sh)
#   2. pretrain recipes/hubert_mel_tiny.yaml on them                  -> WORK_DIR/runs/it1
#   3. iteration-2 targets: layer LAYER of the it1 checkpoint -> k-means (K2) -> labels at 50/s
#   4. pretrain recipes/hubert_mel_tiny_iter2.yaml on them            -> WORK_DIR/runs/it2
#   5. plots of both runs and a summary (masked accuracy at the first and last log line, chance 1/K)
#
# Defaults: MANIFEST_DIR manifests/demo/unlabeled (made by tools/demo.sh), WORK_DIR
# ~/.cache/speechssl/demo/hubert. Label files go to WORK_DIR/it*/labels (task.label_dir), never into
# MANIFEST_DIR. Environment: K1 (100), K2 (100: the demo pool is 5.6 h; BASE uses 500), LAYER (4 of the
# tiny model's 6), RECIPE1 / RECIPE2 (the recipes of the two iterations), UPDATES (max updates per iteration, recipe default), SPEECHSSL (the command), FORCE=1
# (redo everything). Re-running resumes every step (finished labels and runs are kept).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
MANIFEST=${1:-$ROOT/manifests/demo/unlabeled}
WORK=${2:-${SPEECHSSL_DEMO_DIR:-$HOME/.cache/speechssl/demo}/hubert}
if [[ -z "${SPEECHSSL:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then SPEECHSSL="$ROOT/.venv/bin/python -m speechssl"; else SPEECHSSL=speechssl; fi
fi
export SPEECHSSL
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
K1=${K1:-100}
K2=${K2:-100}
LAYER=${LAYER:-4}
RECIPE1=${RECIPE1:-$ROOT/recipes/hubert_mel_tiny.yaml}
RECIPE2=${RECIPE2:-$ROOT/recipes/hubert_mel_tiny_iter2.yaml}
[[ -f "$MANIFEST/train.tsv" ]] || { echo "hubert_demo: $MANIFEST/train.tsv not found (run tools/demo.sh first)" >&2; exit 2; }
EXTRA=(common.log_format=simple)
[[ -n "${UPDATES:-}" ]] && EXTRA+=("optimization.max_update=$UPDATES")
RESTART=()
[[ "${FORCE:-0}" == 1 ]] && RESTART=(--restart --force)
step() { printf '\n== %s\n' "$*"; }
SECONDS=0

step "1/5 iteration-1 labels (MFCC, K=$K1)"
CMVN=${CMVN:-1} K=$K1 bash "$ROOT/tools/hubert_labels.sh" "$MANIFEST" "$WORK"
t_labels1=$SECONDS

step "2/5 pretrain iteration 1 -> $WORK/runs/it1"
$SPEECHSSL pretrain "$RECIPE1" task.data="$MANIFEST" task.label_dir="$WORK/it1/labels" \
  task.label_rate=100 checkpoint.save_dir="$WORK/runs/it1" "${EXTRA[@]}" "${RESTART[@]}"
t_train1=$SECONDS

step "3/5 iteration-2 labels (layer $LAYER of the iteration-1 model, K=$K2)"
K=$K2 LAYER=$LAYER bash "$ROOT/tools/hubert_labels.sh" "$MANIFEST" "$WORK" "$WORK/runs/it1/checkpoint_last.pt"
t_labels2=$SECONDS

step "4/5 pretrain iteration 2 -> $WORK/runs/it2"
$SPEECHSSL pretrain "$RECIPE2" task.data="$MANIFEST" task.label_dir="$WORK/it2/labels" \
  task.label_rate=50 checkpoint.save_dir="$WORK/runs/it2" "${EXTRA[@]}" "${RESTART[@]}"
t_train2=$SECONDS

step "5/5 plots and summary"
$SPEECHSSL plot "$WORK/runs/it1"
$SPEECHSSL plot "$WORK/runs/it2"
summary() {  # masked accuracy of the first and last train record and of the last valid record
  python3 - "$1" "$2" <<'EOF'
import json, sys
recs = [json.loads(line) for line in open(sys.argv[1] + "/metrics.jsonl")]
train = [r for r in recs if r["split"] == "train"]
valid = [r for r in recs if r["split"] == "valid"]
k = int(sys.argv[2])
print(f"  {sys.argv[1]}: masked accuracy {train[0]['accuracy']:.3f} (update {train[0]['update']}) -> "
      f"{train[-1]['accuracy']:.3f} (update {train[-1]['update']}); valid {valid[-1]['accuracy']:.3f}; "
      f"chance 1/{k} = {1 / k:.3f}")
EOF
}
printf '\nDone in %d s (labels it1 %d s, pretrain it1 %d s, labels it2 %d s, pretrain it2 %d s).\n' \
  "$SECONDS" "$t_labels1" $((t_train1 - t_labels1)) $((t_labels2 - t_train1)) $((t_train2 - t_labels2))
summary "$WORK/runs/it1" "$K1"
summary "$WORK/runs/it2" "$K2"
