#!/usr/bin/env python
"""Benchmark speechssl's k-means against scikit-learn's MiniBatchKMeans with fairseq's HuBERT settings.

    python tools/bench_kmeans.py                       # both synthetic cases, 1 repeat
    python tools/bench_kmeans.py --cases mfcc --repeats 3
    python tools/bench_kmeans.py --cases demo          # real MFCC of the demo corpus (K=100)

Cases (data with cluster structure, generated with a fixed seed):

* ``mfcc``:   300,000 x 39,  K=100 (HuBERT iteration 1 shape): Gaussian mixture of 2K components
* ``hubert``: 100,000 x 768, K=500 (iteration 2 shape): Gaussian mixture of 2K components
* ``demo``:   39-d MFCC + deltas of manifests/demo/unlabeled/train.tsv (the demo corpus), K=100

The reference is exactly fairseq's ``examples/hubert/simple_kmeans/learn_kmeans.py``: MiniBatchKMeans
(n_clusters=K, init="k-means++", max_iter=100, batch_size=10000, compute_labels=False, tol=0.0,
max_no_improvement=100, init_size=None, n_init=20, reassignment_ratio=0.0). speechssl runs its defaults
(:class:`speechssl.cluster.kmeans.KMeansSettings`). Both fits are timed in this process on the same data;
both sets of centroids are scored with the same metric: the float64 sum of squared distances of every
point of the full data set to its nearest centroid, reported per point. Ratios: time sklearn / speechssl
(higher is better) and inertia speechssl / sklearn - 1 (negative: speechssl better).

The machine may be shared: the 1-minute load average is printed before each fit, and each fit starts after
a 2 s pause (so that the other library's idle worker threads have parked). OMP_WAIT_POLICY is left as
found and printed: on a busy machine OMP_WAIT_POLICY=PASSIVE speeds both libraries up a lot (no spinning
threads fighting over the cores); on a quiet one it slows speechssl's many small parallel regions ~2x.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from speechssl.cluster.kmeans import KMeansSettings, fit_kmeans, inertia  # noqa: E402

PAUSE = 2.0  # seconds before each timed fit: the other library's idle threads (OpenBLAS spins) park first
CASES = {"mfcc": (300_000, 39, 100), "hubert": (100_000, 768, 500), "demo": (None, 39, 100)}


def gaussian_mixture(n: int, dim: int, components: int, seed: int) -> np.ndarray:
    """``(n, dim)`` float32 from a mixture with Dirichlet weights, N(0, 4) means and per-component,
    per-dimension standard deviations exp(N(0, 0.09))."""
    rng = np.random.default_rng(seed)
    weights = rng.dirichlet(np.ones(components))
    means = rng.standard_normal((components, dim)) * 2.0
    scales = np.exp(rng.standard_normal((components, dim)) * 0.3)
    z = rng.choice(components, n, p=weights)
    return (means[z] + rng.standard_normal((n, dim)) * scales[z]).astype(np.float32)


def demo_mfcc(manifest_dir: Path) -> np.ndarray:
    from speechssl.data.dataset import read_manifest
    from speechssl.features.mfcc import MfccExtractor

    man = read_manifest(manifest_dir / "train.tsv")
    ex = MfccExtractor()
    return np.concatenate([ex.extract_file(man.root / f, 16000) for f in man.files])


def sklearn_fit(x: np.ndarray, k: int, seed: int, threads: int | None) -> np.ndarray:
    from sklearn.cluster import MiniBatchKMeans
    from threadpoolctl import threadpool_limits

    with threadpool_limits(threads):  # None: leave OpenMP / BLAS thread counts alone
        km = MiniBatchKMeans(n_clusters=k, init="k-means++", max_iter=100, batch_size=10000, verbose=0,
                             compute_labels=False, tol=0.0, max_no_improvement=100, init_size=None, n_init=20,
                             reassignment_ratio=0.0, random_state=seed)
        km.fit(x)
    return km.cluster_centers_


def load1() -> float:
    return os.getloadavg()[0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="mfcc,hubert", help=f"comma-separated: {', '.join(CASES)}")
    ap.add_argument("--repeats", type=int, default=1, help="fits per library and case (seeds 0..R-1)")
    ap.add_argument("--demo-manifest", type=Path, default=ROOT / "manifests" / "demo" / "unlabeled")
    ap.add_argument("--algorithm", default="lloyd", choices=("lloyd", "minibatch"))
    ap.add_argument("--n-init", default=str(KMeansSettings.n_init),
                    help="speechssl's seedings; a comma-separated list runs each against the same sklearn fit")
    ap.add_argument("--threads", type=int, default=None,
                    help="threads for both libraries (torch; sklearn's OpenMP and BLAS via threadpoolctl); "
                         "default: each library's own default (all cores)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}, cpus {os.cpu_count()}", flush=True)
    rows = []
    n_inits = [int(v) for v in args.n_init.split(",")]
    for case in args.cases.split(","):
        n, dim, k = CASES[case]
        x = demo_mfcc(args.demo_manifest) if case == "demo" else gaussian_mixture(n, dim, 2 * k, seed=1234)
        n = len(x)
        x64 = torch.from_numpy(x).double()
        for r in range(args.repeats):
            time.sleep(PAUSE)
            l_sk = load1()
            t = time.perf_counter()
            c_sk = sklearn_fit(x, k, seed=r, threads=args.threads)
            t_sk = time.perf_counter() - t
            i_sk = inertia(x64, torch.from_numpy(c_sk).double()) / n
            print(f"{case:7s} {n}x{dim} K={k} seed {r}: sklearn {t_sk:7.2f} s (load {l_sk:.1f}) inertia/pt "
                  f"{i_sk:.4f}", flush=True)
            for n_init in n_inits:
                time.sleep(PAUSE)
                l_ours = load1()
                t = time.perf_counter()
                model = fit_kmeans(torch.from_numpy(x), KMeansSettings(k=k, seed=r, algorithm=args.algorithm,
                                                                       n_init=n_init))
                t_ours = time.perf_counter() - t
                i_ours = inertia(x64, model.centroids.double()) / n
                rows.append((case, n, dim, k, n_init, r, t_sk, t_ours, i_sk, i_ours, l_sk, l_ours))
                print(f"{'':7s} speechssl n_init={n_init}: {t_ours:6.2f} s (load {l_ours:.1f})  speed-up "
                      f"{t_sk / t_ours:5.1f}x  inertia/pt {i_ours:.4f} ({100 * (i_ours / i_sk - 1):+.2f}%)",
                      flush=True)
    print("\n| case | data | K | speechssl n_init | sklearn s | speechssl s | speed-up | sklearn inertia/pt "
          "| speechssl inertia/pt | inertia diff (mean, worst) | load 1-min |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for key in dict.fromkeys((r[0], r[4]) for r in rows):
        sel = [r for r in rows if (r[0], r[4]) == key]
        case, n, dim, k, n_init = sel[0][:5]
        t_sk = statistics.median(r[6] for r in sel)
        t_ours = statistics.median(r[7] for r in sel)
        i_sk = statistics.mean(r[8] for r in sel)
        i_ours = statistics.mean(r[9] for r in sel)
        worst = max(r[9] / r[8] - 1 for r in sel)
        loads = [v for r in sel for v in r[10:]]
        print(f"| {case} | {n:,} x {dim} | {k} | {n_init} | {t_sk:.2f} | {t_ours:.2f} | {t_sk / t_ours:.1f}x | "
              f"{i_sk:.4f} | {i_ours:.4f} | {100 * (i_ours / i_sk - 1):+.2f}%, {100 * worst:+.2f}% | "
              f"{min(loads):.1f}-{max(loads):.1f} |")
    print(f"(median time, mean inertia over {args.repeats} seed(s); inertia diff = speechssl / sklearn - 1; "
          "worst = the seed where speechssl did worst relative to sklearn)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
