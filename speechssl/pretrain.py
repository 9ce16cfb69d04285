"""``speechssl pretrain RECIPE [section.key=value ...]``: self-supervised pretraining (wav2vec 2.0, HuBERT,
data2vec 2.0).

A thin dispatcher: :func:`builder_for` picks the task's ``build(cfg) -> TrainingSetup`` by ``task.name``
and, for ``audio_pretraining`` (fairseq's task of both wav2vec 2.0 and data2vec 2.0), ``model.name``:
:mod:`speechssl.tasks.wav2vec2`, :mod:`speechssl.tasks.data2vec2`, :mod:`speechssl.tasks.hubert`. The
training loop, checkpoints, resume and logging live in :mod:`speechssl.train.loop`.
"""

from __future__ import annotations

import argparse

from speechssl.train.command import add_recipe_arguments, run_recipe

DESCRIPTION = """\
Pretrain a wav2vec 2.0 model on unlabeled audio (fairseq's audio_pretraining task), a data2vec 2.0
model (audio_pretraining with model.name=data2vec2: an EMA teacher's targets, recipes/data2vec2_*.yaml),
or HuBERT on cluster labels of that audio (hubert_pretraining: task.labels=[km], label files
<split>.km and dict.km.txt from 'speechssl label' in task.label_dir), from a recipe (YAML, fairseq key names) and
section.key=value overrides. Runs on CPU or GPU (common.device=auto),
on several local processes (distributed_training.nproc=N), or under torchrun on one or many nodes.

Outputs in checkpoint.save_dir: config.yaml (the resolved recipe), metrics.jsonl (train and valid
records), tb/ (TensorBoard), checkpoint_last.pt, checkpoint_best.pt (lowest valid loss) and
checkpoint_<epoch>_<update>.pt every checkpoint.save_interval_updates. Running the same command again
resumes from checkpoint_last.pt exactly where it stopped (also after a crash or kill); --restart
starts over (with --force it deletes the previous run's files in save_dir).

Examples:
  # the tiny log-mel CPU recipe on the demo pool (about 10 minutes on 2 cores), then plot its curves
  speechssl manifest CORPUS/pool --out manifests/demo/unlabeled --add-split valid=CORPUS/dev
  speechssl pretrain recipes/wav2vec2_mel_tiny.yaml task.data=manifests/demo/unlabeled checkpoint.save_dir=runs/w2v
  speechssl plot runs/w2v

  # wav2vec 2.0 BASE on 8 GPUs of one node; update_freq 8 keeps the published 64-GPU batch
  torchrun --nproc-per-node 8 -m speechssl pretrain recipes/wav2vec2_base.yaml \\
      task.data=manifests/librispeech checkpoint.save_dir=runs/base optimization.update_freq=8

  # two local processes without torchrun (gloo on CPU, NCCL on GPUs)
  speechssl pretrain recipes/wav2vec2_mel_tiny.yaml task.data=manifests/demo/unlabeled distributed_training.nproc=2

  # HuBERT, both iterations on the demo corpus (labels: tools/hubert_labels.sh; all of it: tools/hubert_demo.sh)
  speechssl pretrain recipes/hubert_mel_tiny.yaml task.data=manifests/demo/unlabeled \\
      task.label_dir=work/it1/labels checkpoint.save_dir=runs/hubert_it1
  speechssl pretrain recipes/hubert_mel_tiny_iter2.yaml task.data=manifests/demo/unlabeled \\
      task.label_dir=work/it2/labels checkpoint.save_dir=runs/hubert_it2

  # data2vec 2.0: the small CPU recipe on the demo corpus (log-mel front-end, ~10 minutes on 2 cores)
  speechssl pretrain recipes/data2vec2_tiny.yaml task.data=manifests/demo/unlabeled checkpoint.save_dir=runs/d2v

  # show the resolved configuration and exit
  speechssl pretrain recipes/wav2vec2_base.yaml task.data=manifests/librispeech --print-config
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_recipe_arguments(p)


def builder_for(cfg):
    """The ``build(cfg) -> TrainingSetup`` function of the pretraining task ``task.name`` (and, for
    ``audio_pretraining``, ``model.name``) names."""
    if cfg.task.name == "hubert_pretraining":
        from speechssl.tasks.hubert import build_hubert_pretraining

        return build_hubert_pretraining
    if cfg.task.name != "audio_pretraining":
        from speechssl.config import ConfigError

        raise ConfigError(f"task.name '{cfg.task.name}' is not a pretraining task: use audio_pretraining (wav2vec "
                          "2.0) or hubert_pretraining (HuBERT); fine-tuning tasks run with 'speechssl finetune'")
    if cfg.model.name == "data2vec2":
        from speechssl.tasks.data2vec2 import build_data2vec2_pretraining

        return build_data2vec2_pretraining
    from speechssl.tasks.wav2vec2 import build_wav2vec2_pretraining

    return build_wav2vec2_pretraining


def build_pretraining(cfg):
    """Model, objective, datasets and health alarms of the pretraining task ``cfg`` describes (a
    TrainingSetup): wav2vec 2.0, data2vec 2.0 or HuBERT (see :func:`builder_for`)."""
    return builder_for(cfg)(cfg)


def run(args: argparse.Namespace) -> int:
    return run_recipe(args, "pretrain", builder_for)
