"""Learning-rate schedules as pure functions of the update count, with fairseq's semantics.

``schedule(n)`` is the learning rate of the update that takes the count from ``n`` to ``n + 1`` (fairseq
calls ``step_update(num_updates)`` after every update and once with 0 before the first), so resuming
at update ``n`` restores the learning rate exactly with no scheduler state.

* ``polynomial_decay``: linear warmup ``lr * n / warmup_updates`` (0 at n = 0, as fairseq), then
  ``(lr - end_lr) * (1 - (n - warmup) / (total - warmup)) ** power + end_lr``, ``end_lr`` from ``total``.
* ``tri_stage``: from ``init_lr_scale * lr`` linearly up to ``lr`` over ``phase_ratio[0]`` of the
  updates, hold for ``phase_ratio[1]``, decay exponentially to ``final_lr_scale * lr`` over
  ``phase_ratio[2]``, then stay there.
* ``cosine``: linear warmup from 0, then half a cosine from ``lr`` down to ``min_lr`` at ``total``.
* ``fixed``: ``lr`` (fairseq's warmup: ``lr * (n + 1) / warmup_updates`` during warmup).

``total`` is ``lr_scheduler.total_num_update`` or else ``optimization.max_update``.
"""

from __future__ import annotations

import math
from typing import Callable

from speechssl.config import Config, ConfigError

Schedule = Callable[[int], float]


def polynomial_decay(lr: float, warmup: int, total: int, end_lr: float = 0.0, power: float = 1.0) -> Schedule:
    def schedule(n: int) -> float:
        if warmup > 0 and n <= warmup:
            return lr * n / warmup
        if n >= total:
            return end_lr
        remaining = 1.0 - (n - warmup) / (total - warmup)
        return (lr - end_lr) * remaining**power + end_lr

    return schedule


def tri_stage(
    lr: float, total: int, phase_ratio: tuple[float, float, float], init_lr_scale: float, final_lr_scale: float
) -> Schedule:
    warmup, hold, decay = (int(total * r) for r in phase_ratio)
    init_lr, final_lr = init_lr_scale * lr, final_lr_scale * lr
    warmup_rate = (lr - init_lr) / warmup if warmup else 0.0
    decay_factor = -math.log(final_lr_scale) / decay if decay else 0.0

    def schedule(n: int) -> float:
        if n < warmup:
            return init_lr + warmup_rate * n
        if n < warmup + hold:
            return lr
        if n <= warmup + hold + decay:
            return lr * math.exp(-decay_factor * (n - warmup - hold))
        return final_lr

    return schedule


def cosine(lr: float, warmup: int, total: int, min_lr: float = 0.0) -> Schedule:
    def schedule(n: int) -> float:
        if warmup > 0 and n < warmup:
            return lr * n / warmup
        if n >= total:
            return min_lr
        progress = (n - warmup) / max(1, total - warmup)
        return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))

    return schedule


def fixed(lr: float, warmup: int = 0) -> Schedule:
    def schedule(n: int) -> float:
        if warmup > 0 and n < warmup:
            return lr * (n + 1) / warmup
        return lr

    return schedule


def build_lr_schedule(cfg: Config) -> Schedule:
    """The schedule named by ``lr_scheduler.name`` with peak ``optimization.lr``."""
    s, lr = cfg.lr_scheduler, cfg.optimization.lr
    total = s.total_num_update or cfg.optimization.max_update
    if s.name == "fixed":
        return fixed(lr, s.warmup_updates)
    if total <= 0:
        raise ConfigError(
            f"lr_scheduler.name={s.name} needs the number of updates: set optimization.max_update "
            "(or lr_scheduler.total_num_update)"
        )
    if s.name == "polynomial_decay":  # warmup_updates >= total: all warm-up, cut short (fairseq; a warning)
        return polynomial_decay(lr, s.warmup_updates, total, s.end_learning_rate, s.power)
    if s.name == "tri_stage":
        if s.phase_ratio is None:
            raise ConfigError("lr_scheduler.phase_ratio must be set for tri_stage, e.g. [0.1, 0.4, 0.5]")
        if abs(sum(s.phase_ratio) - 1.0) > 1e-6:
            raise ConfigError(f"lr_scheduler.phase_ratio {list(s.phase_ratio)} must sum to 1")
        return tri_stage(lr, total, s.phase_ratio, s.init_lr_scale, s.final_lr_scale)
    if s.name == "cosine":
        return cosine(lr, s.warmup_updates, total, s.min_lr)
    raise ConfigError(
        f"lr_scheduler.name: unknown schedule '{s.name}'; use polynomial_decay, tri_stage, cosine or fixed"
    )
