"""``speechssl evaluate CKPT MANIFEST_DIR``: score a fine-tuned checkpoint on one split of a manifest.

A thin dispatcher on the checkpoint's ``task.name``: CTC (``audio_finetuning``) ->
:func:`speechssl.tasks.ctc_eval.evaluate_ctc` (decoding, WER/CER); ``speaker_id`` ->
:func:`speechssl.tasks.speaker_id_eval.evaluate_speaker_id`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from speechssl.tasks.ctc_eval import EvaluationError
from speechssl.utils.args import NON_NEGATIVE, POSITIVE

DESCRIPTION = """\
Evaluate a fine-tuned checkpoint on a manifest split. For CTC checkpoints: decode every utterance of
MANIFEST_DIR/<split>.tsv and score against <split>.wrd (WER/CER in percent, jiwer). Works on any manifest
with .wrd transcripts, including audio never seen in training (other folders; other sample rates after
'speechssl manifest --resample-to'). For speaker-ID checkpoints: accuracy (and EER) on <split>.spk.

--out DIR gets report.json (wer, cer, num_utterances, per-speaker scores, settings), utterances.tsv
(path, speaker, reference, hypothesis, errors per utterance), hyp.wrd / ref.wrd aligned with the TSV,
and per_speaker.tsv. The last printed line states the WER.

Decoders (--decoder): greedy (default; batched best path), beam (prefix beam search, no extra
package), flashlight (torchaudio's beam search; optional --lexicon and --lm KenLM model; needs
pip install 'speechssl[decode]').

Examples:
  speechssl evaluate runs/ctc_tiny/checkpoint_best.pt manifests/demo/labeled_10min --split test --out runs/ctc_tiny/eval_test
  speechssl evaluate runs/ft10h/checkpoint_best.pt manifests/librispeech --split test_other \\
      --decoder flashlight --lexicon librispeech_lexicon.lst --lm 4-gram.arpa --lm-weight 2 --word-score -1
  # speaker ID: accuracy, top-5, per speaker, confusion matrix; cosine EER over 4000 trial pairs
  speechssl evaluate runs/sid_frozen/checkpoint_best.pt manifests/demo/speaker_id --split test \
      --out runs/sid_frozen/eval_test --eer-trials 4000
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="checkpoint of 'speechssl finetune' (e.g. runs/x/checkpoint_best.pt)")
    p.add_argument("manifest_dir", help="manifest folder holding <split>.tsv and its labels")
    p.add_argument("--split", default="valid", help="split name: reads <split>.tsv and <split>.wrd")
    p.add_argument("--out", help="write report.json, utterances.tsv, hyp/ref files, per_speaker.tsv here")
    p.add_argument("--force", action="store_true", help="overwrite existing files in --out")
    p.add_argument("--batch-size", type=POSITIVE, default=None,
                   help="utterances per batch (default: 1 for group-norm extractors, which normalise over the "
                   "padding too, so that scores do not depend on batching; else batches of --max-tokens)")
    p.add_argument("--max-tokens", type=POSITIVE, default=None,
                   help="audio samples per batch, padding included (default 1,600,000 where batching is exact)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    g = p.add_argument_group("CTC decoding")
    g.add_argument("--decoder", choices=["greedy", "beam", "flashlight"], default="greedy")
    g.add_argument("--beam-size", type=POSITIVE, default=20, help="beam / flashlight: hypotheses kept per frame")
    g.add_argument("--lexicon", help="flashlight: lexicon file (WORD spelling per line) constraining the words")
    g.add_argument("--lm", help="flashlight: KenLM language model (ARPA or binary)")
    g.add_argument("--lm-weight", type=float, default=2.0, help="flashlight: language model weight")
    g.add_argument("--word-score", type=float, default=0.0, help="flashlight: score added per word")
    g = p.add_argument_group("speaker ID")
    g.add_argument("--eer-trials", type=NON_NEGATIVE, default=0,
                   help="verification: score this many trial pairs (half same-speaker) by cosine similarity of the "
                        "utterance embeddings and report the EER (0: off)")
    g.add_argument("--eer-split", help="split the trials are drawn from (default: --split; any speakers)")
    g.add_argument("--eer-seed", type=NON_NEGATIVE, default=0, help="seed of the trial draw")


def checkpoint_task(path: str | Path) -> str:
    """``task.name`` stored in a checkpoint (error naming the file when it has none)."""
    from speechssl.train.checkpoint import load_checkpoint

    path = Path(path)
    state = load_checkpoint(path)  # CheckpointError: missing, a folder, damaged, another toolkit's file
    task = state["config"].get("task")
    name = task.get("name") if isinstance(task, dict) else None
    if not name:
        raise EvaluationError(f"{path}: its stored config has no task.name (not written by 'speechssl finetune')")
    return str(name)


def run(args: argparse.Namespace) -> int:
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from speechssl.data.dataset import ManifestError
    from speechssl.text.vocab import VocabError
    from speechssl.utils.io import file_in_the_way

    try:
        blocker = file_in_the_way(args.out) if args.out else None
        if blocker is not None:  # found now, not after the scoring
            raise EvaluationError(f"--out {args.out}: {blocker} is a file, not a folder; choose another --out")
        task = checkpoint_task(args.checkpoint)
        if task == "speaker_id":
            from speechssl.tasks.speaker_id_eval import evaluate_speaker_id

            evaluate_speaker_id(args.checkpoint, args.manifest_dir, args.split, args.out, device=args.device,
                                batch_size=args.batch_size, extra=args)
            return 0
        if task != "audio_finetuning":
            raise EvaluationError(f"{args.checkpoint}: task.name={task} is not a fine-tuned task (audio_finetuning "
                                  "or speaker_id); pretrained checkpoints are fine-tuned first ('speechssl finetune')")
        from speechssl.tasks.ctc_eval import evaluate_ctc

        evaluate_ctc(args.checkpoint, args.manifest_dir, args.split, args.out, device=args.device,
                     batch_size=args.batch_size, max_tokens=args.max_tokens, decoder=args.decoder,
                     beam_size=args.beam_size, lexicon=args.lexicon, lm=args.lm, lm_weight=args.lm_weight,
                     word_score=args.word_score, force=args.force)
    except (EvaluationError, ManifestError, VocabError, ImportError, RuntimeError) as exc:
        print(f"speechssl evaluate: {exc}", file=sys.stderr)
        return 1
    return 0
