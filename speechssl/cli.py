"""The ``speechssl`` command: a thin layer that parses arguments and calls library functions.

Each subcommand lives in the module that does the work, as a pair ``add_arguments(parser)`` /
``run(args) -> int`` plus a ``DESCRIPTION`` with a worked example; the table below lists them all.
Command modules import heavy dependencies (torch, librosa) inside ``run`` so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import re
import sys

from speechssl import __version__
from speechssl import configure as config_cmd
from speechssl.data import manifest as manifest_cmd
from speechssl import corpus as synth_cmd
from speechssl import pretrain as pretrain_cmd
from speechssl import finetune as finetune_cmd
from speechssl import evaluate as evaluate_cmd
from speechssl import probe as probe_cmd
from speechssl.text import spm as spm_cmd
from speechssl.train import plot as plot_cmd
from speechssl.features import cli as features_cmd
from speechssl.cluster import kmeans_cli as kmeans_cmd
from speechssl.cluster import label_cli as label_cmd
from speechssl.interop import cli as interop_cli

# name -> (module, one-line help). Order is the order ``speechssl --help`` shows.
COMMANDS = {
    "manifest": (manifest_cmd, "audio folder -> fairseq manifests (tsv, transcripts, speakers), or --check one"),
    "corpus": (synth_cmd, "synthesize the offline demo corpus (LibriSpeech layout) with Debian TTS engines"),
    "config": (config_cmd, "print a recipe resolved with its base chain and key=value overrides"),
    "pretrain": (pretrain_cmd, "self-supervised pretraining (wav2vec 2.0): CPU, GPUs, torchrun; resumes itself"),
    "finetune": (finetune_cmd, "fine-tune a pretrained upstream: CTC speech recognition or speaker ID; resumes itself"),
    "evaluate": (evaluate_cmd, "score a fine-tuned checkpoint on a manifest split: WER/CER (CTC) or speaker ID"),
    "probe": (probe_cmd, "frozen-upstream probes (SUPERB style): ASR (BiLSTM + CTC) or speaker ID on a checkpoint or fbank"),
    "spm": (spm_cmd, "train a sentencepiece unigram/BPE model on .wrd transcripts (CTC output units)"),
    "plot": (plot_cmd, "PNG plots of a training run's curves (loss, accuracy, perplexity, LR, throughput)"),
    "features": (features_cmd, "HuBERT k-means inputs: MFCC or a model layer's frame features, sharded"),
    "kmeans": (kmeans_cmd, "fit k-means (greedy k-means++ + Lloyd, torch) on sampled frame features"),
    "label": (label_cmd, "HuBERT frame labels <split>.km + dict.km.txt from features and a k-means model"),
    "import": (interop_cli.import_command, "fairseq .pt / transformers / torchaudio / fairseq2 checkpoint -> speechssl"),
    "export": (interop_cli.export_command, "speechssl checkpoint -> transformers / torchaudio / fairseq2 / ONNX"),
    "extract": (interop_cli.extract_command, "per-utterance layer-wise encoder features (memory-mappable, sharded)"),
}


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="speechssl",
        description="Self-supervised speech representation learning: wav2vec 2.0 / HuBERT pretraining, "
        "CTC and speaker-ID fine-tuning, evaluation.",
        epilog="Run 'speechssl COMMAND --help' for a command's options and a worked example.",
    )
    parser.add_argument("--version", action="version", version=f"speechssl {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=module.DESCRIPTION, formatter_class=_Formatter)
        module.add_arguments(p)
        p.set_defaults(_run=module.run, _parser=p)
    return parser


OVERRIDE = re.compile(r"^[A-Za-z_]\w*\.[A-Za-z_]\w*=")  # section.key=value


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse ``argv``; ``section.key=value`` overrides may come anywhere, also after options
    (``speechssl pretrain R --restart task.data=X``), in the order given."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        sub = getattr(args, "_parser", parser)
        if hasattr(args, "overrides") and all(OVERRIDE.match(a) for a in extra):
            args.overrides = list(args.overrides) + extra
        else:
            sub.error(f"unrecognized arguments: {' '.join(a for a in extra if not OVERRIDE.match(a))}")
    return args


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse_args(parser, argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    from speechssl.config import ConfigError
    from speechssl.utils.io import os_error_message

    try:
        return int(args._run(args) or 0)
    except ConfigError as exc:
        print(f"speechssl {args.command}: config error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # unwritable or full disk, a file where a folder belongs ...: one line, no traceback
        print(f"speechssl {args.command}: {os_error_message(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"speechssl {args.command}: interrupted", file=sys.stderr)
        return 130


def entry() -> None:
    """The ``speechssl`` program (console script and ``python -m speechssl``): :func:`main`, then exit.

    A process that was one rank of a multi-process run (torchrun) leaves through
    :func:`speechssl.train.distributed.exit_worker`, as spawned ranks do, without interpreter finalization.
    """
    code = main()
    from speechssl.train import distributed

    if distributed.joined_group():
        distributed.exit_worker(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
