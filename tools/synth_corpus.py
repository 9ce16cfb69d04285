#!/usr/bin/env python3
"""Build the offline demo corpus (same as ``speechssl corpus``); ``--help`` for options and an example."""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from speechssl import corpus  # noqa: E402


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="synth_corpus.py", description=corpus.DESCRIPTION, formatter_class=_Formatter)
    corpus.add_arguments(parser)
    return corpus.run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
