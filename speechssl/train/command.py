"""What ``speechssl pretrain`` and ``speechssl finetune`` share: the recipe arguments and the run itself.

Kept free of torch imports at module level: ``run_recipe`` sets ``OMP_WAIT_POLICY`` before torch loads.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Callable


def add_recipe_arguments(p: argparse.ArgumentParser) -> None:
    """``RECIPE [section.key=value ...] [--restart [--force]] [--print-config]``."""
    p.add_argument("recipe", help="recipe YAML (path, or a name under recipes/)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="typed recipe overrides")
    p.add_argument("--restart", action="store_true",
                   help="start over instead of resuming from save_dir/checkpoint_last.pt")
    p.add_argument("--force", action="store_true", help="with --restart: delete the previous run in save_dir")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def run_recipe(args: argparse.Namespace, command: str, builder: Callable[[Any], Callable],
               errors: tuple[type[Exception], ...] = ()) -> int:
    """Resolve the recipe, then train with ``builder(cfg)`` (the task's ``build(cfg) -> TrainingSetup``).

    Returns the exit status: 0 done, 1 for a data/training error (``errors`` plus bad manifests and
    non-finite losses, printed as one line naming the file or cause), 2 for misused options.
    """
    # OpenMP threads that sleep instead of spinning while idle: with spinning, a CPU run on a busy
    # machine (or next to DataLoader workers) is several times slower. Only effective before torch loads.
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from speechssl.config import config_to_yaml, load_config
    from speechssl.config_check import warnings

    cfg = load_config(args.recipe, args.overrides)
    if args.print_config:
        print(config_to_yaml(cfg), end="")
        return 0
    if args.force and not args.restart:
        print(f"speechssl {command}: --force only applies with --restart (a run resumes without it)")
        return 2
    if os.environ.get("RANK", "0") == "0":
        for line in warnings(cfg):
            print(f"speechssl {command}: warning: {line}", file=sys.stderr)
    build = builder(cfg)
    from speechssl.data.dataset import ManifestError
    from speechssl.train.checkpoint import CheckpointError
    from speechssl.train.distributed import DistributedError
    from speechssl.train.loop import RunOptions, run_training
    from speechssl.train.trainer import NonFiniteError
    from speechssl.utils.io import os_error_message

    cfg.checkpoint.restart = cfg.checkpoint.restart or args.restart
    try:
        run_training(cfg, build, RunOptions(restart=cfg.checkpoint.restart, force=args.force))
    except (ManifestError, NonFiniteError, CheckpointError, DistributedError, *errors) as exc:
        print(f"speechssl {command}: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"speechssl {command}: {os_error_message(exc)}; the checkpoints already written are intact: run the "
              "same command again to resume", file=sys.stderr)
        return 1
    return 0
