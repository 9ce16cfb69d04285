"""``speechssl kmeans``: fit k-means on sampled frame features (HuBERT target clustering)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from speechssl.utils.args import NON_NEGATIVE, POSITIVE, number

DESCRIPTION = """\
Fit k-means on frame features written by 'speechssl features' (or fairseq's dump_*_feature.py) and save
the model (torch.save of tensors and plain data: centroids, k, dim, inertia, settings; loadable with
weights_only=True). FEATURES is a features folder (with --split) or a list of .npy shards (each with
its .len beside it).

Like fairseq's learn_kmeans.py, the fit uses a random --sample-percent of the utterances (HuBERT: 10%).
Algorithm: greedy k-means++ seeding (scikit-learn's, 2 + ln K candidates per centre) on --init-size
frames, --n-init times, each refined by Lloyd on its own frames; the best on held-out frames is refined
by full-batch Lloyd on all sampled frames (--algorithm lloyd, default) or by scikit-learn-style mini-batch
updates (--algorithm minibatch). Runs on the GPU when there is one. The inertia printed is the mean
squared distance of a frame to its centroid (fairseq's "total inertia").
Measured against scikit-learn's MiniBatchKMeans with fairseq's settings: tools/bench_kmeans.py.

Examples:
  # HuBERT iteration 1: K=100 on 10% of the train MFCCs
  speechssl kmeans feats/mfcc --split train --k 100 --sample-percent 10 --out km/mfcc_k100.pt

  # iteration 2: K=500 on layer-6 features; fairseq shards given as files
  speechssl kmeans feats/l6/train_0_2.npy feats/l6/train_1_2.npy --k 500 --out km/l6_k500.pt

Next: speechssl label MANIFEST_DIR --split train --features feats/mfcc --km km/mfcc_k100.pt
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    from speechssl.cluster.settings import ALGORITHMS, PRECISIONS, KMeansSettings as S

    p.add_argument("features", nargs="+", metavar="FEATURES", help="features folder, or .npy shard files")
    p.add_argument("--split", default="train", help="split to read from a features folder")
    p.add_argument("--nshard", type=POSITIVE, default=None, help="shard count to read (when a folder holds several)")
    p.add_argument("--k", type=POSITIVE, required=True, help="number of clusters (HuBERT: 100, then 500)")
    p.add_argument("--out", required=True, help="k-means model file to write (.pt)")
    p.add_argument("--sample-percent", type=number(0, 100, low_open=True), default=10.0,
                   help="percentage (0-100] of the utterances to fit on (fairseq's --percent 0.1 is 10)")
    p.add_argument("--algorithm", choices=ALGORITHMS, default=S.algorithm)
    p.add_argument("--n-init", type=POSITIVE, default=S.n_init, help="seedings tried; the best is refined")
    p.add_argument("--init-size", type=POSITIVE, default=None, help="frames per seeding (default max(30000, 3K))")
    p.add_argument("--max-iter", type=POSITIVE, default=S.max_iter, help="Lloyd iterations / mini-batch epochs")
    p.add_argument("--tol", type=number(0), default=S.tol,
                   help="Lloyd: stop when the relative inertia improvement is below this")
    p.add_argument("--batch-size", type=POSITIVE, default=S.batch_size, help="mini-batch only")
    p.add_argument("--max-no-improvement", type=NON_NEGATIVE, default=S.max_no_improvement, help="mini-batch only")
    p.add_argument("--precision", choices=PRECISIONS, default=S.precision,
                   help="bf16: seeding and first Lloyd phase with bf16 products (final phase always fp32)")
    p.add_argument("--seed", type=NON_NEGATIVE, default=S.seed)
    p.add_argument("--device", default=S.device, help="auto | cpu | cuda | cuda:N")
    p.add_argument("--force", action="store_true", help="replace an existing --out")


def run(args: argparse.Namespace) -> int:
    from speechssl.cluster.kmeans import KMeansSettings, fit_kmeans
    from speechssl.features.store import FeatureSet, FeatureStoreError

    out = Path(args.out)
    if out.exists() and not args.force:
        print(f"speechssl kmeans: {out} exists; pass --force to replace it", file=sys.stderr)
        return 2
    if not 0 < args.sample_percent <= 100:
        print(f"speechssl kmeans: --sample-percent must be in (0, 100], got {args.sample_percent}", file=sys.stderr)
        return 2
    try:
        settings = KMeansSettings(k=args.k, algorithm=args.algorithm, n_init=args.n_init, init_size=args.init_size,
                                  max_iter=args.max_iter, tol=args.tol, batch_size=args.batch_size,
                                  max_no_improvement=args.max_no_improvement, seed=args.seed, device=args.device,
                                  precision=args.precision)
        paths = [Path(f) for f in args.features]
        if len(paths) == 1 and paths[0].is_dir():
            features = FeatureSet.open(paths[0], args.split, args.nshard)
        else:
            features = FeatureSet.from_npy(paths)
        frames, n_utt = features.sample(args.sample_percent / 100.0, args.seed)
        print(f"sampled {n_utt} of {len(features.lengths)} utterances ({args.sample_percent:g}%): {len(frames)} "
              f"frames of dim {features.dim}")
        model = fit_kmeans(frames, settings, log=print)
    except (FeatureStoreError, ValueError) as exc:
        print(f"speechssl kmeans: {exc}", file=sys.stderr)
        return 1
    model.features = {"source": [str(p.resolve()) for p in paths], "split": args.split,
                      "kind": features.meta.get("kind"), "rate": features.rate, "dim": features.dim,
                      "sample_percent": args.sample_percent, "utterances": n_utt, "frames": len(frames)}
    model.save(out)
    print(f"wrote {out}: K={model.k}, dim {model.dim}, inertia per frame {model.inertia_per_frame:.4f} on "
          f"{model.num_frames} frames, {model.seconds:.1f} s")
    return 0
