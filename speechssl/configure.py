"""``speechssl config RECIPE [key=value ...]``: show the resolved configuration of a recipe."""

from __future__ import annotations

import argparse

DESCRIPTION = """\
Print a recipe resolved with its 'base:' chain and section.key=value overrides, exactly as a run
would use it (training commands also take --print-config and save this file beside their outputs).

Example:
  speechssl config recipes/wav2vec2_base.yaml optimization.lr=1e-4 common.bf16=true
  speechssl config recipes/wav2vec2_base.yaml --out resolved.yaml
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="recipe YAML file (path, or a name under recipes/)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="typed overrides")
    p.add_argument("--out", help="write the resolved YAML here (atomically) instead of printing it")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from speechssl.config import config_to_yaml, load_config, save_config

    cfg = load_config(args.recipe, args.overrides)
    if args.out:
        if Path(args.out).exists() and not args.force:
            print(f"speechssl config: {args.out} exists; pass --force to overwrite it")
            return 1
        save_config(cfg, args.out)
        print(f"wrote {args.out}")
    else:
        print(config_to_yaml(cfg), end="")
    return 0
