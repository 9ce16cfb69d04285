"""``speechssl pretrain RECIPE [section.key=value ...]``: self-supervised pretraining (wav2vec 2.0).

The task part is small: :func:`build_pretraining` makes the model, the objective and the datasets from
the config; the training loop, checkpoints, resume and logging live in :mod:`speechssl.train.loop`.
"""

from __future__ import annotations

import argparse
import os
import sys

DESCRIPTION = """\
Pretrain a wav2vec 2.0 model on unlabeled audio (fairseq's audio_pretraining task) from a recipe
(YAML, fairseq key names) and section.key=value overrides. Runs on CPU or GPU (common.device=auto),
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

  # show the resolved configuration and exit
  speechssl pretrain recipes/wav2vec2_base.yaml task.data=manifests/librispeech --print-config
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="recipe YAML (path, or a name under recipes/)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="typed recipe overrides")
    p.add_argument("--restart", action="store_true",
                   help="start over instead of resuming from save_dir/checkpoint_last.pt")
    p.add_argument("--force", action="store_true", help="with --restart: delete the previous run in save_dir")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def build_pretraining(cfg):
    """Model, objective, datasets and health alarms of wav2vec 2.0 pretraining (a TrainingSetup)."""
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
        find_unused_parameters=cfg.distributed_training.find_unused_parameters or m.encoder_layerdrop > 0,
    )


def run(args: argparse.Namespace) -> int:
    # OpenMP threads that sleep instead of spinning while idle: with spinning, a CPU run on a busy
    # machine (or next to DataLoader workers) is several times slower. Only effective before torch loads.
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from speechssl.config import config_to_yaml, load_config

    cfg = load_config(args.recipe, args.overrides)
    if args.print_config:
        print(config_to_yaml(cfg), end="")
        return 0
    if args.force and not args.restart:
        print("speechssl pretrain: --force only applies with --restart (a run resumes without it)")
        return 2
    from speechssl.data.dataset import ManifestError
    from speechssl.train.loop import RunOptions, run_training
    from speechssl.train.trainer import NonFiniteError

    cfg.checkpoint.restart = cfg.checkpoint.restart or args.restart
    try:
        run_training(cfg, build_pretraining, RunOptions(restart=cfg.checkpoint.restart, force=args.force))
    except (ManifestError, NonFiniteError) as exc:
        print(f"speechssl pretrain: {exc}", file=sys.stderr)
        return 1
    return 0
