"""k-means in torch: greedy k-means++ seeding, full-batch Lloyd or mini-batch updates, CPU or GPU.

HuBERT's targets are k-means cluster ids of frame features (fairseq fits scikit-learn's
``MiniBatchKMeans(init="k-means++", n_init=20, batch_size=10000, max_iter=100, max_no_improvement=100,
reassignment_ratio=0.0)`` in ``examples/hubert/simple_kmeans/learn_kmeans.py``). This module does the
same job with matrix products:

* distances ``||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2`` from one ``addmm`` per chunk of rows, so memory
  stays bounded (:func:`chunk_rows` rows x K distances) whatever the number of frames; the data are
  centred first, which keeps the ``x.c`` products small and the difference precise;
* **greedy k-means++** (Arthur & Vassilvitskii; scikit-learn's default): every new centre is the best of
  ``2 + ln K`` candidates drawn with probability proportional to the squared distance to the nearest
  centre so far, the best being the one that lowers the total potential most. This seeding is what
  decides the final quality (plain k-means++ or random seeding ends 25-40% worse). It runs on a random
  subsample of ``init_size`` rows and is refined by Lloyd on that subsample (cheap, and most of the way),
  ``n_init`` times; the result with the lowest inertia on a shared held-out sample goes on;
* **Lloyd** (default): full-batch assignment + mean update on all rows until the relative inertia
  improvement falls below ``tol``; empty clusters are moved to the points farthest from their centres.
  For 128+ dimensions the products run in bf16 first, then fp32 to finish. Or **mini-batch**
  (scikit-learn's update rule: per-centre running means, early stop when the smoothed batch inertia has
  not improved for ``max_no_improvement`` batches).

Inertia is the sum over points of the squared distance to the nearest centre (scikit-learn's
``inertia_``); :attr:`KMeansModel.inertia_per_frame` divides it by the number of points (what fairseq's
``learn_kmeans.py`` prints).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

from speechssl.cluster.settings import PRECISIONS, KMeansSettings

FORMAT = "speechssl-kmeans"
VERSION = 1


def chunk_rows(k: int, device: torch.device) -> int:
    """Rows per distance block: ~4k rows (a cache-sized block) on the CPU, ~256 MB of distances on GPUs."""
    if device.type == "cpu":
        return 4096
    return max(4096, (256 << 20) // (4 * max(k, 1)))


def resolve_device(device: str = "auto") -> torch.device:
    """``auto``: the first CUDA device when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_precision(precision: str, device: torch.device, dim: int) -> str:
    """``auto``: ``bf16`` for features of 128+ dimensions on GPUs and on CPUs with native bf16 matmuls
    (AVX-512 BF16 / AMX), where the ``x.c`` products dominate; ``fp32`` otherwise (for 39-d MFCC the
    time goes to the arg-min and the mean update, and bf16 would only cost precision)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        return precision
    if dim < 128 or (device.type == "cpu" and not torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        return "fp32"
    return "bf16"


# --------------------------------------------------------------------------------------------------
# Distances
# --------------------------------------------------------------------------------------------------


def nearest_centroids(x: Tensor, centroids: Tensor, chunk: Optional[int] = None,
                      shift: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Nearest centre of every row, in the centroids' dtype (fp32 or fp64) on their device.

    Args:
        x: ``(N, D)`` points (any float dtype, any device: moved chunk by chunk, e.g. from a memmap).
        centroids: ``(K, D)``.
        chunk: rows per distance block (default :func:`chunk_rows`).
        shift: ``(D,)`` subtracted from every row of ``x`` (pass centroids already shifted by it): with
            the centroids' mean, distances stay precise for features far from the origin (MFCC's c0).

    Returns ``labels`` ``(N,)`` int64 and ``sqdist`` ``(N,)`` squared distances (clamped at 0).
    """
    labels, sqdist, _, _ = _assign(x, centroids, None, chunk, accumulate=False, shift=shift)
    return labels, sqdist


def _assign(x: Tensor, centroids: Tensor, x_sqnorm: Optional[Tensor], chunk: Optional[int], accumulate: bool,
            x_low: Optional[Tensor] = None, shift: Optional[Tensor] = None
            ) -> tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor]]:
    """One pass over ``x`` ``(N, D)``: labels ``(N,)``, squared distances ``(N,)`` and, with ``accumulate``,
    per-cluster sums ``(K, D)`` and counts ``(K,)`` for the Lloyd update (added chunk by chunk, while the
    chunk is in cache). ``x_low``: a bf16 copy of ``x`` to take the ``x.c`` products from (fast, about 3
    significant digits: the distances and the labels of near-ties are approximate)."""
    dev, dt = centroids.device, centroids.dtype
    K, N = centroids.shape[0], x.shape[0]
    chunk = chunk or chunk_rows(K, dev)
    c_sqnorm = (centroids * centroids).sum(1)
    ct = centroids.T
    ct_low = ct.to(x_low.dtype) if x_low is not None else None
    labels = torch.empty(N, dtype=torch.long, device=dev)
    sqdist = torch.empty(N, dtype=dt, device=dev)
    sums = torch.zeros_like(centroids) if accumulate else None
    for s in range(0, N, chunk):
        e = min(s + chunk, N)
        xs = x[s:e].to(device=dev, dtype=dt, non_blocking=True)
        if shift is not None:
            xs = xs - shift
        if x_low is None:
            d = torch.addmm(c_sqnorm, xs, ct, alpha=-2.0)  # ||c||^2 - 2 x.c   (m, K)
        else:
            d = (x_low[s:e] @ ct_low).to(dt).mul_(-2.0).add_(c_sqnorm)
        torch.min(d, dim=1, out=(sqdist[s:e], labels[s:e]))
        sqdist[s:e] += (xs * xs).sum(1) if x_sqnorm is None else x_sqnorm[s:e]
        if sums is not None:
            sums.index_add_(0, labels[s:e], xs)
    sqdist.clamp_(min=0.0)
    counts = torch.bincount(labels, minlength=K) if accumulate else None
    return labels, sqdist, sums, counts


def inertia(x: Tensor, centroids: Tensor, chunk: Optional[int] = None) -> float:
    """Sum over the rows of ``x`` of the squared distance to the nearest centre (float64 accumulation;
    pass float64 centroids for a float64 computation)."""
    _, d = nearest_centroids(x, centroids, chunk=chunk)
    return float(d.double().sum())


# --------------------------------------------------------------------------------------------------
# Seeding
# --------------------------------------------------------------------------------------------------


def greedy_kmeans_plusplus(x: Tensor, k: int, generator: torch.Generator,
                           n_local_trials: Optional[int] = None) -> Tensor:
    """Greedy k-means++: indices ``(k,)`` of the rows of ``x`` ``(N, D)`` chosen as initial centres.

    Each step draws ``n_local_trials`` (default ``2 + int(ln k)``, as scikit-learn) candidates with
    probability proportional to the current squared distance to the nearest centre and keeps the one
    whose addition gives the lowest total potential. A step costs one ``(N, D) x (D, L)`` product, so
    ``x`` in bf16 halves its memory traffic (the norms and the potentials stay fp32).
    Same algorithm and sampling as ``sklearn.cluster.kmeans_plusplus``; not the same random numbers.
    Every pick stays on the device (1-element index tensors, never a Python int): on a GPU the host
    queues all ``k`` steps without waiting for one.
    """
    N, D = x.shape
    if N < k:
        raise ValueError(f"cannot seed {k} centres from {N} points: sample more frames or lower --k")
    L = n_local_trials or 2 + int(math.log(k))
    dev = x.device
    x_sqnorm = x.float().pow(2).sum(1)
    idx = torch.empty(k, dtype=torch.long, device=dev)
    idx[:1] = torch.randint(N, (1,), generator=generator, device=dev)
    first = x.index_select(0, idx[:1])[0]  # (D,)
    closest = (x_sqnorm + x_sqnorm.index_select(0, idx[:1]) - 2.0 * (x @ first).float()).clamp_(min=0.0)  # (N,)
    for c in range(1, k):
        cum = torch.cumsum(closest, 0, dtype=torch.float64)
        r = torch.rand(L, generator=generator, device=dev, dtype=torch.float64) * cum[-1]
        cand = torch.searchsorted(cum, r).clamp_(max=N - 1)  # (L,)
        d = (x @ x[cand].T).float()  # (N, L): one pass over x, row-major
        d.mul_(-2.0).add_(x_sqnorm[:, None]).add_(x_sqnorm[cand][None, :])
        torch.minimum(d, closest[:, None], out=d)  # potential if each candidate were added
        best = torch.argmin(d.sum(0)).view(1)
        closest = d.index_select(1, best)[:, 0].clamp(min=0.0)
        idx[c : c + 1] = cand.index_select(0, best)
    return idx


# --------------------------------------------------------------------------------------------------
# Refinement
# --------------------------------------------------------------------------------------------------


def lloyd(x: Tensor, centroids: Tensor, max_iter: int = 100, tol: float = 1e-4,
          x_low: Optional[Tensor] = None, chunk: Optional[int] = None) -> tuple[Tensor, float, int]:
    """Full-batch Lloyd iterations from ``centroids`` ``(K, D)`` on ``x`` ``(N, D)``.

    A phase stops when an iteration lowers the inertia by less than ``tol`` (relative). With ``x_low``
    (a bf16 copy of ``x``) a first phase assigns with bf16 products, then a second phase in the
    centroids' precision finishes; the means are always accumulated from ``x``. At most ``max_iter``
    updates in all. Empty clusters are moved onto the points farthest from their centres.
    Returns ``(centroids, inertia, n_iter)``; the inertia is exact for the returned centroids.
    """
    x_sqnorm = (x * x).sum(1)
    n_iter, cur = 0, math.inf
    for low in ([x_low] if x_low is not None else []) + [None]:
        prev = math.inf
        while True:
            _, d, sums, counts = _assign(x, centroids, x_sqnorm, chunk, n_iter < max_iter, x_low=low)
            cur = float(d.double().sum())
            if n_iter == max_iter or prev - cur <= tol * cur:
                break
            prev = cur
            centroids = sums / counts.clamp(min=1).unsqueeze(1).to(sums.dtype)
            empty = counts == 0
            if bool(empty.any()):
                centroids[empty] = x[torch.topk(d, int(empty.sum())).indices]
            n_iter += 1
    return centroids, cur, n_iter


def minibatch(x: Tensor, centroids: Tensor, generator: torch.Generator, batch_size: int = 10000,
              max_iter: int = 100, max_no_improvement: Optional[int] = 100, tol: float = 0.0
              ) -> tuple[Tensor, int]:
    """scikit-learn's mini-batch k-means update (``reassignment_ratio=0``) from ``centroids``.

    ``max_iter * N // batch_size`` steps at most; each draws ``batch_size`` rows with replacement and
    moves every centre to the running mean of all points ever assigned to it. Early stop when the
    exponentially smoothed batch inertia has not improved for ``max_no_improvement`` steps, or when the
    squared centre shift is at most ``tol * mean feature variance`` (``tol=0`` disables that).
    Returns ``(centroids, steps)``.
    """
    N = x.shape[0]
    dev = centroids.device
    counts = torch.zeros(centroids.shape[0], dtype=centroids.dtype, device=dev)
    n_steps = max(1, max_iter * N // batch_size)
    alpha = min(1.0, batch_size * 2.0 / (N + 1))
    tol_abs = tol * float(x.var(0).mean()) if tol > 0 else 0.0
    ewa = ewa_min = None
    no_improvement = 0
    step = 0
    for step in range(1, n_steps + 1):
        xb = x[torch.randint(N, (batch_size,), generator=generator, device=dev)]
        _, d, sums, cnt = _assign(xb, centroids, None, None, accumulate=True)
        new_counts = counts + cnt
        seen = (cnt > 0).unsqueeze(1)
        updated = (centroids * counts.unsqueeze(1) + sums) / new_counts.clamp(min=1).unsqueeze(1)
        shift = float(((updated - centroids) ** 2 * seen).sum()) if tol_abs > 0 else 0.0
        centroids = torch.where(seen, updated, centroids)
        counts = new_counts
        if step == 1:
            continue  # the first batch's inertia is the seeding's
        batch_inertia = float(d.sum()) / batch_size
        ewa = batch_inertia if ewa is None else ewa * (1 - alpha) + batch_inertia * alpha
        if tol_abs > 0 and shift <= tol_abs:
            break
        if ewa_min is None or ewa < ewa_min:
            ewa_min, no_improvement = ewa, 0
        else:
            no_improvement += 1
        if max_no_improvement is not None and no_improvement >= max_no_improvement:
            break
    return centroids, step


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------


@dataclass
class KMeansModel:
    """A fitted k-means model: what ``speechssl kmeans`` saves and ``speechssl label`` applies."""

    centroids: Tensor  # (K, D) float32, CPU
    inertia: float  # sum of squared distances over the fit data
    num_frames: int  # rows of the fit data
    n_iter: int  # Lloyd iterations or mini-batch steps run
    seconds: float  # fit time (seeding + refinement)
    settings: dict[str, Any] = field(default_factory=dict)
    features: dict[str, Any] = field(default_factory=dict)  # where the fit data came from (rate, dim, ...)

    @property
    def k(self) -> int:
        return self.centroids.shape[0]

    @property
    def dim(self) -> int:
        return self.centroids.shape[1]

    @property
    def inertia_per_frame(self) -> float:
        return self.inertia / max(self.num_frames, 1)

    def predict(self, x: Tensor | np.ndarray, device: str = "auto") -> Tensor:
        """Cluster id ``(N,)`` int64 (CPU) of every row of ``x`` ``(N, D)`` (a tensor, an array, a memmap)."""
        if isinstance(x, np.ndarray):  # read-only memmaps are copied (torch tensors must be writable)
            x = torch.from_numpy(np.require(x, dtype=np.float32, requirements=["W"]))
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"features of shape {tuple(x.shape)} do not match the k-means dimension {self.dim}")
        c = self.centroids.to(resolve_device(device))
        mean = c.mean(0)
        return nearest_centroids(x, c - mean, shift=mean)[0].cpu()

    def to_dict(self) -> dict[str, Any]:
        """Tensors and plain data only: ``torch.load(path, weights_only=True)`` reads it."""
        return {
            "format": FORMAT, "version": VERSION, "centroids": self.centroids.contiguous(), "k": self.k,
            "dim": self.dim, "inertia": self.inertia, "inertia_per_frame": self.inertia_per_frame,
            "num_frames": self.num_frames, "n_iter": self.n_iter, "seconds": self.seconds,
            "settings": dict(self.settings), "features": dict(self.features),
        }

    def save(self, path: str | Path) -> None:
        from speechssl.utils.io import atomic_open

        with atomic_open(path, "wb") as fh:
            torch.save(self.to_dict(), fh)

    @classmethod
    def load(cls, path: str | Path) -> "KMeansModel":
        try:
            d = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise FileNotFoundError(f"k-means model not found: {path} (make one with 'speechssl kmeans')") from None
        except Exception:  # torch's message would advise weights_only=False: say what the file is instead
            from speechssl.interop.identify import identify

            raise ValueError(f"{path} is {identify(path).what}, not a speechssl k-means model (make one with "
                             "'speechssl kmeans')") from None
        if not isinstance(d, dict) or d.get("format") != FORMAT or not isinstance(d.get("centroids"), Tensor):
            raise ValueError(f"{path} is not a speechssl k-means model (written by 'speechssl kmeans')")
        c = d["centroids"].float()
        if c.dim() != 2 or c.shape[0] < 1:
            raise ValueError(f"{path}: centroids of shape {tuple(c.shape)}; expected (K >= 1, dim)")
        return cls(centroids=c, inertia=float(d["inertia"]), num_frames=int(d["num_frames"]),
                   n_iter=int(d["n_iter"]), seconds=float(d["seconds"]), settings=dict(d.get("settings", {})),
                   features=dict(d.get("features", {})))


def fit_kmeans(x: Tensor | np.ndarray, settings: KMeansSettings, log=None) -> KMeansModel:
    """Fit k-means on ``x`` ``(N, D)`` (copied to the settings' device as float32).

    1. centre the data (k-means is translation invariant; small ``x.c`` products keep
       ``||x||^2 - 2 x.c + ||c||^2`` precise), add the mean back at the end;
    2. ``n_init`` greedy k-means++ seedings, each on ``init_size`` random rows and (``lloyd``) refined by
       Lloyd on those rows; keep the one with the lowest inertia on a shared held-out sample;
    3. ``lloyd`` on all rows from there (a few iterations: it starts close); or ``minibatch``.

    ``log``: optional callable taking a progress message.
    """
    say = log or (lambda msg: None)
    s = settings
    dev = resolve_device(s.device)
    t0 = time.perf_counter()
    x = torch.as_tensor(x).to(device=dev, dtype=torch.float32)
    N, D = x.shape
    if N < s.k:
        raise ValueError(f"{N} frames cannot make {s.k} clusters: sample more data (--sample-percent) or lower --k")
    mean = x.mean(0, dtype=torch.float64)
    if not bool(torch.isfinite(mean).all()):  # a NaN/inf anywhere makes its column's mean non-finite
        raise ValueError("features contain NaN or inf: check the feature extraction")
    x = x - mean.float()  # a new tensor: the caller's array is left alone
    low = resolve_precision(s.precision, dev, D) == "bf16"
    x_low = x.bfloat16() if low else None
    gen = torch.Generator(device=dev).manual_seed(s.seed)
    init_size = min(N, s.init_size or max(30000, 3 * s.k))
    valid = x[torch.randint(N, (init_size,), generator=gen, device=dev)]
    best, best_inertia = None, math.inf
    for i in range(s.n_init):
        rows = torch.randperm(N, generator=gen, device=dev)[:init_size]
        idx = greedy_kmeans_plusplus((x_low if low else x)[rows], s.k, gen, s.n_local_trials)
        c, n_sub = x[rows[idx]], 0
        if s.algorithm == "lloyd" and init_size < N:  # cheap, and ranks the seedings far better
            c, _, n_sub = lloyd(x[rows], c, s.max_iter, s.tol, x_low[rows] if low else None)
        val = inertia(valid, c)
        say(f"seeding {i + 1}/{s.n_init}" + (f" + {n_sub} Lloyd iterations on it" if n_sub else "")
            + f": inertia per frame {val / init_size:.4f} on {init_size} random frames")
        if val < best_inertia:
            best, best_inertia = c, val
    if s.algorithm == "lloyd":
        centroids, total, n_iter = lloyd(x, best, s.max_iter, s.tol, x_low)
        say(f"lloyd: {n_iter} iterations on all {N} frames")
    else:
        centroids, n_iter = minibatch(x, best, gen, s.batch_size, s.max_iter, s.max_no_improvement, s.tol)
        total = inertia(x, centroids)
        say(f"minibatch: {n_iter} steps of {s.batch_size} frames")
    seconds = time.perf_counter() - t0
    say(f"inertia per frame {total / N:.4f}, {seconds:.1f} s")
    return KMeansModel(centroids=(centroids + mean.float()).cpu(), inertia=total, num_frames=N, n_iter=n_iter,
                       seconds=seconds, settings=asdict(s))
