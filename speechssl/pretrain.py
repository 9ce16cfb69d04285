"""``speechssl pretrain RECIPE [section.key=value ...]``: self-supervised pretraining (wav2vec 2.0, HuBERT).

The task part is small: :func:`build_pretraining` makes the model, the objective and the datasets from
the config (``task.name``: ``audio_pretraining`` for wav2vec 2.0, ``hubert_pretraining`` for HuBERT,
see :func:`build_hubert_pretraining`); the training loop, checkpoints, resume and logging live in
:mod:`speechssl.train.loop`.
"""

from __future__ import annotations

import argparse

from speechssl.train.command import add_recipe_arguments, run_recipe

DESCRIPTION = """\
Pretrain a wav2vec 2.0 model on unlabeled audio (fairseq's audio_pretraining task), or HuBERT on
cluster labels of that audio (hubert_pretraining: task.labels=[km], label files <split>.km and
dict.km.txt from 'speechssl label' in task.label_dir), from a recipe (YAML, fairseq key names) and
section.key=value overrides. Runs on CPU or GPU (common.device=auto),
on several local processes (distributed_training.nproc=N), or under torchrun on one or many nodes.

Outputs in checkpoint.save_dir: config.yaml (the resolved recipe), metrics.jsonl (train and valid
records), tb/ (TensorBoard), checkpoint_last.pt, checkpoint_best.pt (lowest valid loss) and
checkpoint_<epoch>_<update>.pt every checkpoint.save_interval_updates. Running the same command again
resumes from checkpoint_last.pt exactly where it stopped (also after a crash or kill); --restart
starts over (with --force it deletes the previous run's files in save_dir).

Examples:
  # the tiny CPU recipe on the demo corpus (about 10 minutes on 2 cores), then plot its curves
  speechssl manifest /tmp/demo_corpus/train --out manifests/demo --add-split valid=/tmp/demo_corpus/dev
  speechssl pretrain recipes/wav2vec2_tiny.yaml task.data=manifests/demo checkpoint.save_dir=runs/tiny
  speechssl plot runs/tiny

  # wav2vec 2.0 BASE on 8 GPUs of one node; update_freq 8 keeps the published 64-GPU batch
  torchrun --nproc-per-node 8 -m speechssl pretrain recipes/wav2vec2_base.yaml \\
      task.data=manifests/librispeech checkpoint.save_dir=runs/base optimization.update_freq=8

  # two local processes without torchrun (gloo on CPU, NCCL on GPUs)
  speechssl pretrain recipes/wav2vec2_tiny.yaml task.data=manifests/demo distributed_training.nproc=2

  # HuBERT, both iterations on the demo corpus (labels: tools/hubert_labels.sh; all of it: tools/hubert_demo.sh)
  speechssl pretrain recipes/hubert_tiny.yaml task.data=manifests/demo/unlabeled \\
      task.label_dir=work/it1/labels task.label_rate=100 checkpoint.save_dir=runs/hubert_it1
  speechssl pretrain recipes/hubert_tiny.yaml task.data=manifests/demo/unlabeled \\
      task.label_dir=work/it2/labels task.label_rate=50 checkpoint.save_dir=runs/hubert_it2

  # show the resolved configuration and exit
  speechssl pretrain recipes/wav2vec2_base.yaml task.data=manifests/librispeech --print-config
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_recipe_arguments(p)


def build_pretraining(cfg):
    """Model, objective, datasets and health alarms of wav2vec 2.0 pretraining (a TrainingSetup);
    HuBERT's (:func:`build_hubert_pretraining`) when ``task.name`` is ``hubert_pretraining``."""
    if cfg.task.name == "hubert_pretraining":
        return build_hubert_pretraining(cfg)
    if cfg.task.name != "audio_pretraining":
        from speechssl.config import ConfigError

        raise ConfigError(f"task.name '{cfg.task.name}' is not a pretraining task: use audio_pretraining (wav2vec "
                          "2.0) or hubert_pretraining (HuBERT); fine-tuning tasks run with 'speechssl finetune'")
    from speechssl.data.dataset import dataset_for_split
    from speechssl.models import build_model
    from speechssl.objectives import build_objective
    from speechssl.train.loop import TrainingSetup
    from speechssl.train.metrics import HealthMonitor

    m = cfg.model
    model = build_model(m)
    objective = build_objective(cfg.criterion, m)
    train = dataset_for_split(cfg, cfg.dataset.train_subset)
    valid = None if cfg.dataset.disable_validation else dataset_for_split(cfg, cfg.dataset.valid_subset)
    health = HealthMonitor(
        codebook_size=m.latent_groups * m.latent_vars if m.quantize_targets else None,
        chance_accuracy=1.0 / (1 + m.num_negatives + m.cross_sample_negatives + m.codebook_negatives),
        start_update=min(max(2 * cfg.lr_scheduler.warmup_updates, 500), 5000),
    )
    return TrainingSetup(
        model=model, objective=objective, train_data=train, valid_data=valid, health=health,
        find_unused_parameters=may_leave_parameters_unused(cfg),
        probe=pretraining_probe(cfg),
    )


def may_leave_parameters_unused(cfg) -> bool:
    """Whether a pretraining step can leave a parameter without gradient, so that DDP must look for them
    (``find_unused_parameters``, an extra pass over the graph every step): LayerDrop skipping a layer, or a
    conv extractor frozen by ``feature_grad_mult: 0``; or the recipe asks for it."""
    m = cfg.model
    frozen_extractor = m.feature_grad_mult == 0 and m.extractor_mode != "fbank"
    return cfg.distributed_training.find_unused_parameters or m.encoder_layerdrop > 0 or frozen_extractor


def pretraining_probe(cfg):
    """The ``probe.*`` settings as the loop's probe function (None when ``probe.data`` is not set)."""
    if not cfg.probe.data:
        return None
    from speechssl.config import ConfigError
    from speechssl.tasks.probe import training_probe

    if cfg.checkpoint.best_checkpoint_metric.startswith("probe_"):
        raise ConfigError(f"checkpoint.best_checkpoint_metric={cfg.checkpoint.best_checkpoint_metric}: probe "
                          "metrics are logged, not used to select checkpoints; choose a validation metric such "
                          "as loss or accuracy")
    return training_probe(cfg.probe, cfg.task.normalize)


def build_hubert_pretraining(cfg):
    """HuBERT: label dictionaries -> ``model.num_classes`` / ``model.label_rate``, model, objective,
    datasets with label targets checked against the audio lengths, chance-accuracy alarm (a TrainingSetup).

    ``model.num_classes`` and ``model.label_rate`` are filled from the dictionaries and ``task.label_rate``
    (and stored in the checkpoints' config); values set in the recipe must agree with them.
    """
    from pathlib import Path

    from speechssl.config import ConfigError
    from speechssl.data.dataset import dataset_for_split
    from speechssl.data.labels import LabelCollater, LabelDictionary, check_label_lengths
    from speechssl.models.hubert import HubertModel
    from speechssl.objectives import build_objective
    from speechssl.train.loop import TrainingSetup
    from speechssl.train.metrics import HealthMonitor

    t, m = cfg.task, cfg.model
    if m.name != "hubert":
        raise ConfigError(f"task.name=hubert_pretraining needs model.name=hubert, got '{m.name}'")
    if not t.labels:
        raise ConfigError("task.labels is empty: HuBERT needs frame labels, e.g. task.labels=[km] (files <split>.km "
                          "and dict.km.txt from 'speechssl label')")
    if t.label_rate <= 0:
        raise ConfigError("set task.label_rate (labels per second): 100 for MFCC k-means labels, 50 for labels of "
                          "layer features (iteration 2)")
    if m.label_rate > 0 and m.label_rate != t.label_rate:
        raise ConfigError(f"model.label_rate={m.label_rate:g} differs from task.label_rate={t.label_rate:g}; "
                          "leave model.label_rate unset (it follows the task)")
    label_dir = Path(t.label_dir) if t.label_dir else Path(t.data)
    dictionaries = [LabelDictionary(label_dir / f"dict.{name}.txt") for name in t.labels]
    num_classes = [len(d) for d in dictionaries]
    if m.num_classes and list(m.num_classes) != num_classes:
        raise ConfigError(f"model.num_classes={list(m.num_classes)} but the dictionaries in {label_dir} have "
                          f"{num_classes} classes; leave model.num_classes unset (it is read from them)")
    m.num_classes, m.label_rate = num_classes, t.label_rate

    model = HubertModel(m, sample_rate=t.sample_rate)
    objective = build_objective(cfg.criterion, m)
    train = dataset_for_split(cfg, cfg.dataset.train_subset, t.labels)
    check_label_lengths(train, t.labels, t.label_rate)
    valid = None
    if not cfg.dataset.disable_validation:
        valid = dataset_for_split(cfg, cfg.dataset.valid_subset, t.labels)
        check_label_lengths(valid, t.labels, t.label_rate)
    health = HealthMonitor(chance_accuracy=1.0 / min(num_classes),
                           start_update=min(max(2 * cfg.lr_scheduler.warmup_updates, 500), 5000))
    return TrainingSetup(
        model=model, objective=objective, train_data=train, valid_data=valid,
        collate=LabelCollater(dictionaries, t.label_rate, t.sample_rate, pad=t.enable_padding), health=health,
        find_unused_parameters=may_leave_parameters_unused(cfg),
        probe=pretraining_probe(cfg),
        summary=[f"labels: {', '.join(t.labels)} from {label_dir}, {num_classes} classes, {t.label_rate:g} labels/s "
                 f"(chance accuracy {1.0 / min(num_classes):.3f})"],
    )


def run(args: argparse.Namespace) -> int:
    return run_recipe(args, "pretrain", lambda cfg: build_pretraining)
