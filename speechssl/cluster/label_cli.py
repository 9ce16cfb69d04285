"""``speechssl label``: HuBERT frame labels (<split>.km + dict.km.txt) from features and a k-means model."""

from __future__ import annotations

import argparse
import sys

from speechssl.utils.args import NON_NEGATIVE, POSITIVE, number

DESCRIPTION = """\
Assign every frame of MANIFEST_DIR/<split>.tsv's features to its nearest k-means centroid and write
<split>.km (one line per TSV entry, in TSV order: the space-separated cluster ids of its frames) and
dict.km.txt (one '<id> 1' line per cluster, fairseq's HuBERT format) into MANIFEST_DIR, or --out.

Before anything is written, every utterance's label count is checked against its audio duration at the
label rate (default: the features' frame rate; --label-rate to state it, as task.label_rate): more than
--tolerance seconds apart (fairseq's check, 0.1 s) is an error listing each utterance with its numbers.
The features must come from this very TSV (checked by its sha1). Files are written atomically; an
existing <split>.km (or a dict.km.txt for another K) is replaced only with --force.

Work is done per feature shard into <out>/.<split>.km.parts/ and resumes from there; with --shard i
(or torchrun) only shard i is labeled and the process that completes the last shard writes the files.

Examples:
  speechssl label manifests/ls100 --split train --features feats/mfcc --km km/mfcc_k100.pt
  speechssl label manifests/ls100 --split valid --features feats/mfcc --km km/mfcc_k100.pt
  # labels elsewhere (one folder per HuBERT iteration), then pretrain with
  # task.labels=[km] task.label_dir=labels/it1 task.label_rate=100
  speechssl label manifests/ls100 --split train --features feats/mfcc --km km/mfcc_k100.pt --out labels/it1
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    from speechssl.cluster.label import DEFAULT_TOLERANCE

    p.add_argument("manifest_dir", metavar="MANIFEST_DIR", help="folder holding <split>.tsv")
    p.add_argument("--split", default="train", help="manifest split to label")
    p.add_argument("--features", required=True, help="features folder written by 'speechssl features'")
    p.add_argument("--km", required=True, help="k-means model written by 'speechssl kmeans'")
    p.add_argument("--out", default=None, help="folder for <split>.km and dict.km.txt (default MANIFEST_DIR)")
    p.add_argument("--label-rate", type=number(0, low_open=True), default=None,
                   help="labels per second to check against (default: the features' frame rate)")
    p.add_argument("--tolerance", type=number(0), default=DEFAULT_TOLERANCE,
                   help="allowed |audio seconds - labels / label rate| per utterance, in seconds")
    p.add_argument("--nshard", type=POSITIVE, default=None, help="shard count of the features (if several)")
    p.add_argument("--shard", type=NON_NEGATIVE, default=None, help="label only this feature shard")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--force", action="store_true", help="replace existing <split>.km / dict.km.txt")


def run(args: argparse.Namespace) -> int:
    from speechssl.cluster.label import LabelError, write_labels
    from speechssl.data.dataset import ManifestError
    from speechssl.features.store import FeatureStoreError

    try:
        write_labels(args.manifest_dir, args.split, args.features, args.km, args.out, args.label_rate,
                     args.tolerance, args.force, args.device, args.shard, args.nshard)
    except (LabelError, FeatureStoreError, ManifestError, FileNotFoundError, ValueError) as exc:
        print(f"speechssl label: {exc}", file=sys.stderr)
        return 1
    return 0
