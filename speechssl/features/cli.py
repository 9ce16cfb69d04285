"""``speechssl features {mfcc,layer}``: frame features of a manifest split for HuBERT's k-means targets."""

from __future__ import annotations

import argparse
import sys

from speechssl.utils.args import NON_NEGATIVE, POSITIVE

DESCRIPTION = """\
Extract frame features of MANIFEST_DIR/<split>.tsv into OUT as fairseq's sharded layout: per shard
<split>_<i>_<n>.npy (float32 frames x dim, memory-mappable), <split>_<i>_<n>.len (frames per utterance)
and <split>_<i>_<n>.json (dim, rate, manifest, line range, settings; written last: a shard without it is
unfinished and is redone).

  mfcc   39-d Kaldi MFCC + deltas + delta-deltas, 100 frames/s (HuBERT iteration 1, fairseq's
         dump_mfcc_feature.py)
  layer  output of transformer layer --layer of a trained speechssl checkpoint, 50 frames/s for the
         published conv stacks (HuBERT iteration 2: layer 6 of the iteration-1 BASE model)

Shards split the manifest lines as fairseq does. Without --shard every shard is done in turn; with
--shard i only shard i (run several processes, or torchrun: RANK/WORLD_SIZE pick the shard). Finished
shards made the same way are skipped, so an interrupted run resumes; --force redoes them.

Examples:
  # iteration 1: MFCC of train and valid, 4 shards in parallel
  for i in 0 1 2 3; do
    speechssl features mfcc manifests/ls100 --split train --out feats/mfcc --nshard 4 --shard $i &
  done; wait
  speechssl features mfcc manifests/ls100 --split valid --out feats/mfcc

  # iteration 2: layer 6 of the iteration-1 model, one shard per GPU
  torchrun --nproc_per_node 8 -m speechssl features layer manifests/ls100 --split train \\
      --ckpt runs/hubert_it1/checkpoint_best.pt --layer 6 --out feats/it1_l6

Next: speechssl kmeans feats/mfcc --split train --k 100 --out km100.pt
"""


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("manifest_dir", metavar="MANIFEST_DIR", help="folder holding <split>.tsv")
    p.add_argument("--split", default="train", help="manifest split: reads MANIFEST_DIR/<split>.tsv")
    p.add_argument("--out", required=True, help="features folder (created)")
    p.add_argument("--nshard", type=POSITIVE, default=None, help="shards to cut the split into (default 1, or "
                   "WORLD_SIZE under torchrun)")
    p.add_argument("--shard", type=NON_NEGATIVE, default=None, help="do only this shard (0-based; default: all)")
    p.add_argument("--num-workers", type=NON_NEGATIVE, default=2, help="data-loader processes reading audio "
                   "(one torch thread each; 0: read in the main process)")
    p.add_argument("--force", action="store_true", help="redo finished shards")


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="kind", metavar="KIND")
    fmt = type("_Formatter", (argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter), {})
    m = sub.add_parser("mfcc", help="39-d MFCC + deltas + delta-deltas at 100 Hz", description=DESCRIPTION,
                       formatter_class=fmt)
    _common(m)
    m.add_argument("--sample-rate", type=POSITIVE, default=16000, help="every file must have this rate")
    m.add_argument("--cmvn", action="store_true",
                   help="standardize each utterance's 39 dims (not in fairseq; for audio whose microphone changes)")
    lay = sub.add_parser("layer", help="a trained model's transformer layer output", description=DESCRIPTION,
                         formatter_class=fmt)
    _common(lay)
    lay.add_argument("--ckpt", required=True, help="checkpoint written by 'speechssl pretrain'")
    lay.add_argument("--layer", type=POSITIVE, required=True, help="transformer layer, 1-based (HuBERT BASE: 6)")
    lay.add_argument("--max-chunk", type=POSITIVE, default=1_600_000,
                     help="longer utterances are run in chunks of this many samples")
    lay.add_argument("--device", default="auto", help="auto (cuda:LOCAL_RANK if a GPU) | cpu | cuda:N")
    p.set_defaults(_features_parser=p)


def run(args: argparse.Namespace) -> int:
    if not getattr(args, "kind", None):
        args._features_parser.print_help()
        return 2
    import torch

    from speechssl.data.dataset import ManifestError
    from speechssl.features.extract import extract_split
    from speechssl.features.store import FeatureStoreError

    try:
        if args.kind == "mfcc":
            from speechssl.features.mfcc import MfccExtractor

            torch.set_num_threads(1)  # per-file MFCCs are tiny ops; threads only spin
            extractor = MfccExtractor(args.sample_rate, cmvn=args.cmvn)
        else:
            from speechssl.features.layer import LayerExtractor

            extractor = LayerExtractor(args.ckpt, args.layer, args.device, args.max_chunk)
        extract_split(extractor, args.manifest_dir, args.split, args.out, args.shard, args.nshard, args.force,
                      args.num_workers)
    except (FeatureStoreError, ManifestError, FileNotFoundError, RuntimeError) as exc:
        print(f"speechssl features {args.kind}: {exc}", file=sys.stderr)
        return 1
    return 0
