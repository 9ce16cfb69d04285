"""``speechssl corpus`` (and ``tools/synth_corpus.py``): the command line of the corpus synthesizer."""
from __future__ import annotations

import argparse
import sys

from speechssl.corpus.build import synthesize_corpus
from speechssl.corpus.common import ENGINES, SynthError

DESCRIPTION = """\
Synthesize the offline demo corpus: a LibriSpeech-layout speech corpus (train / dev / test subsets with
disjoint speakers, plus an unlabeled pretraining pool of many more speakers of its own; 16 kHz mono FLAC,
<speaker>-<chapter>.trans.txt transcripts, SPEAKERS.TXT) built with
the Debian TTS engines espeak-ng, flite and festival plus sox, from natural English sentences of the
fortunes and wordnet-base packages. Same seed and settings => byte-identical corpus. If OUT already holds
a finished corpus with the same settings it is reused; a different one is replaced only with --force.

Needs the Debian packages espeak-ng flite festival festvox-kallpc16k festvox-kdlpc16k festvox-us-slt-hts
sox fortunes fortunes-min wordnet-base wamerican (tools/setup.sh installs them).

example (default: about 45 minutes from 30 speakers = 24 train + 3 dev + 3 test, and a pool of 5.5 hours
from 160 other speakers; a few minutes on 2 cores):
  speechssl corpus /tmp/demo_corpus
  python tools/synth_corpus.py /tmp/demo_corpus --minutes 120 --speakers 40 --seed 1 --workers 4
  speechssl corpus /tmp/small --minutes 10 --speakers 8 --pool-minutes 0 --pool-speakers 0   # no pool
  speechssl manifest /tmp/demo_corpus ...     # then build manifests from it
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out_dir", metavar="OUT", help="corpus directory to create")
    parser.add_argument("--minutes", type=float, default=45.0, help="audio of train, dev and test together")
    parser.add_argument("--speakers", type=int, default=30, help="speakers of train, dev and test together")
    for subset in ("dev", "test"):
        parser.add_argument(f"--{subset}-speakers", type=int, default=None,
                            help=f"{subset} speakers; None: 10%% of --speakers, at least 1")
    parser.add_argument("--pool-minutes", type=float, default=330.0,
                        help="unlabeled pretraining pool (subset 'pool'), speakers of its own; 0: none")
    parser.add_argument("--pool-speakers", type=int, default=160, help="speakers of the pool; 0: none")
    parser.add_argument("--seed", type=int, default=0, help="the corpus is a function of the seed and settings")
    parser.add_argument("--engines", default=None,
                        help=f"comma-separated subset of {','.join(ENGINES)}; None: every one installed")
    parser.add_argument("--workers", type=int, default=None,
                        help="worker processes; None: CPU cores (the output does not depend on it)")
    parser.add_argument("--force", action="store_true", help="replace a corpus with different settings in OUT")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    try:
        summary = synthesize_corpus(
            args.out_dir, minutes=args.minutes, speakers=args.speakers, dev_speakers=args.dev_speakers,
            test_speakers=args.test_speakers, seed=args.seed, pool_minutes=args.pool_minutes,
            pool_speakers=args.pool_speakers,
            engines=[e.strip() for e in args.engines.split(",") if e.strip()] if args.engines else None,
            workers=args.workers, force=args.force, progress=not args.no_progress)
    except SynthError as exc:
        print(f"speechssl corpus: error: {exc}", file=sys.stderr)
        return 2
    print(summary.report())
    return 0
