"""k-means settings (torch-free, so that ``speechssl --help`` does not load torch)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

ALGORITHMS = ("lloyd", "minibatch")
PRECISIONS = ("auto", "bf16", "fp32")


@dataclass
class KMeansSettings:
    """How :func:`speechssl.cluster.kmeans.fit_kmeans` fits (defaults measured in tools/bench_kmeans.py)."""

    k: int
    algorithm: str = "lloyd"  # lloyd | minibatch
    n_init: int = 1  # seedings (each refined on its subsample); the best goes on. 3: ~0.4% lower inertia, 2x time
    init_size: Optional[int] = None  # rows each seeding sees (default: min(N, max(30000, 3k)))
    n_local_trials: Optional[int] = None  # default 2 + int(ln k)
    max_iter: int = 100  # Lloyd iterations, or mini-batch epochs
    tol: float = 1e-3  # Lloyd: stop below this relative inertia improvement; mini-batch: centre shift (0: off)
    batch_size: int = 10000  # mini-batch only
    max_no_improvement: Optional[int] = 100  # mini-batch only
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"  # bf16: seeding + a first Lloyd phase with bf16 products; auto: bf16 if fast

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {', '.join(ALGORITHMS)}, got {self.algorithm!r}")
        if self.n_init < 1 or self.max_iter < 0 or self.batch_size < 1:
            raise ValueError("n_init and batch_size must be >= 1 and max_iter >= 0")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
