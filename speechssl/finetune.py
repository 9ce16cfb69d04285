"""``speechssl finetune RECIPE [section.key=value ...]``: supervised fine-tuning of a pretrained upstream.

Dispatches on ``task.name``: ``audio_finetuning`` -> CTC ASR (:mod:`speechssl.tasks.ctc`), ``speaker_id``
-> speaker identification (:mod:`speechssl.tasks.speaker_id`). Both run through the same training loop as
pretraining (:func:`speechssl.train.loop.run_training`: resume, DDP, logging, plots, checkpoints).
"""

from __future__ import annotations

import argparse

from speechssl.text.vocab import VocabError
from speechssl.train.command import add_recipe_arguments, run_recipe

DESCRIPTION = """\
Fine-tune a pretrained wav2vec 2.0 / HuBERT checkpoint (model.w2v_path) on labeled audio: CTC speech
recognition (task.name=audio_finetuning, recipes/ctc_*.yaml) or speaker identification
(task.name=speaker_id). Without model.w2v_path the same architecture is trained from scratch.

CTC: targets are letters (task.labels=[ltr], dict.ltr.txt) or sentencepiece units (task.labels=[wrd]
task.spm_model=M.model, from 'speechssl spm train'). Validation reports WER/CER (greedy decoding) every
dataset.validate_interval_updates; checkpoint_best.pt is the lowest valid WER. Outputs in
checkpoint.save_dir as for pretraining (config.yaml, metrics.jsonl, tb/, checkpoints); running the same
command again resumes; --restart starts over.

Examples:
  # 10 minutes of labels on the demo corpus, from the tiny pretrained model (CPU, ~10 min)
  speechssl finetune recipes/ctc_tiny.yaml task.data=manifests/demo/labeled_10min \\
      model.w2v_path=runs/tiny/checkpoint_best.pt checkpoint.save_dir=runs/ctc_tiny
  speechssl evaluate runs/ctc_tiny/checkpoint_best.pt manifests/demo/labeled_10min --split test

  # speaker ID (SUPERB protocol: frozen upstream, weighted layer sum + pooling head; ~2 min on CPU);
  # the closed-set split holds out a quarter of every training speaker's utterances
  speechssl manifest CORPUS/train --out manifests/demo/speaker_id --split-by utterance --valid-percent 0.25
  speechssl finetune recipes/speaker_id_frozen.yaml task.data=manifests/demo/speaker_id \\
      model.w2v_path=runs/tiny/checkpoint_best.pt checkpoint.save_dir=runs/sid_frozen
  speechssl evaluate runs/sid_frozen/checkpoint_best.pt manifests/demo/speaker_id --split valid --out runs/sid_frozen/eval

  # the published BASE 10 h recipe (LibriSpeech / Libri-light manifests), 8 GPUs
  torchrun --nproc-per-node 8 -m speechssl finetune recipes/ctc_base_10h.yaml \\
      task.data=manifests/ll10h model.w2v_path=wav2vec_small.pt checkpoint.save_dir=runs/ft10h

  # sentencepiece units instead of letters
  speechssl spm train manifests/ls100/train.wrd --out manifests/ls100/spm_unigram300 --vocab-size 300
  speechssl finetune recipes/ctc_base_100h.yaml task.data=manifests/ls100 task.labels=[wrd] \\
      task.spm_model=manifests/ls100/spm_unigram300.model model.w2v_path=wav2vec_small.pt
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_recipe_arguments(p)


def builder_for(task_name: str):
    """The ``build(cfg) -> TrainingSetup`` function of a fine-tuning task."""
    if task_name == "audio_finetuning":
        from speechssl.tasks.ctc import build_ctc_finetuning

        return build_ctc_finetuning
    if task_name == "speaker_id":
        from speechssl.tasks.speaker_id import build_speaker_id

        return build_speaker_id
    from speechssl.config import ConfigError

    raise ConfigError(f"task.name='{task_name}' is not a fine-tuning task; use audio_finetuning (CTC) or "
                      "speaker_id (pretraining: 'speechssl pretrain')")


def run(args: argparse.Namespace) -> int:
    return run_recipe(args, "finetune", lambda cfg: builder_for(cfg.task.name), errors=(VocabError,))
