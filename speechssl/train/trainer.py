"""One optimizer update from a list of micro-batches, independent of the model and the objective.

The objective is any callable ``objective(model, batch) -> out`` with ``out.loss`` (a scalar: the SUM of
the per-frame losses plus weighted extra terms times ``sample_size``, fairseq's convention),
``out.sample_size`` (frames the loss sums over) and ``out.logs`` (dict of floats or 0-d tensors).

An update (:meth:`Trainer.train_step`):

1. for each micro-batch ``j`` (``optimization.update_freq`` of them): seed the RNGs from
   ``(common.seed, num_updates, j * world_size + rank)`` -- dropout, masks and negatives then depend only
   on which global micro-batch is processed, not on the number of processes or on a resume -- run the
   objective under autocast and backpropagate the summed loss (DDP gradient sync on the last micro-batch
   only);
2. all-reduce the loss, sample size and logs over ranks (one collective, one host sync; until then
   values known on the host stay Python numbers and device values stay on the device, so a micro-batch
   never waits for the device);
3. scale the gradients by ``world_size / total sample_size`` (DDP averages over ranks, so the result is
   sum over all frames / total frames, as fairseq), clip to ``optimization.clip_norm``;
4. skip the update if the loss or the gradient norm is not finite (fp16: the loss scaler lowers its
   scale instead), abort after ``optimization.max_consecutive_nonfinite`` skipped updates in a row;
5. step with the learning rate ``schedule(num_updates)``; a model with a moving-average teacher (data2vec
   2.0) then moves it towards the new weights (``model.update_teacher(num_updates + 1)``); then
   ``model.set_num_updates(num_updates + 1)``.

Log values are averaged over micro-batches and ranks weighted by sample size, except counts
(:data:`SUM_KEYS`) which are summed.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import warnings
from typing import Any, Callable, Iterable, Optional

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from speechssl.config import Config, ConfigError
from speechssl.train.distributed import DistEnv, all_gather_object, all_reduce_sum
from speechssl.train.lr_scheduler import build_lr_schedule
from speechssl.train.optim import build_optimizer

SUM_KEYS = frozenset({"num_masked", "nsentences", "ntokens", "sample_size", "correct", "count",
                      "w_errors", "w_total", "c_errors", "c_total"})
VALID_STREAM = 0x7A11D  # seed-stream tag of validation batches


class NonFiniteError(FloatingPointError):
    """Too many consecutive non-finite updates (or the fp16 loss scale collapsed)."""


class _DDP(DistributedDataParallel):
    """DDP that forwards unknown attributes to the wrapped model, so objectives can call its methods."""

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)


def micro_batch_seed(seed: int, stream: int, index: int) -> int:
    """A 63-bit seed for global micro-batch ``index`` of update (or stream) ``stream``."""
    return int(np.random.SeedSequence([seed, stream, index]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def move_to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Tensors (also inside lists) to ``device``; other values as they are."""

    def move(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return v.to(device, non_blocking=True)
        if isinstance(v, list) and v and isinstance(v[0], torch.Tensor):
            return [move(t) for t in v]
        return v

    return {k: move(v) for k, v in batch.items()}


def resolve_precision(cfg: Config, device: torch.device, warn: bool = True) -> Optional[torch.dtype]:
    """Autocast dtype: bf16 (CPU/CUDA), fp16 (CUDA; on CPU falls back to bf16 with a warning) or None."""
    c = cfg.common
    if c.fp16 and c.bf16:
        raise ConfigError("common.fp16 and common.bf16 are both true; choose one")
    if c.fp16 and device.type != "cuda":
        if warn:
                warnings.warn("common.fp16 needs CUDA; using bf16 autocast on CPU instead (set common.fp16=false "
                          "common.bf16=true to silence this)", stacklevel=2)
        return torch.bfloat16
    return torch.float16 if c.fp16 else torch.bfloat16 if c.bf16 else None


class Trainer:
    """Owns the (DDP-wrapped) model, the objective, optimizer, LR schedule, loss scaler and update count."""

    def __init__(self, cfg: Config, model: nn.Module, objective: Callable, env: DistEnv,
                 find_unused_parameters: bool = False):
        self.cfg, self.env = cfg, env
        self.model = model.to(env.device)
        if cfg.common.compile:
            from speechssl.models.components import compile_transformer_layers

            compile_transformer_layers(self.model)
        self.objective = objective.to(env.device) if isinstance(objective, nn.Module) else objective
        self.wrapped: nn.Module = self.model
        if env.distributed:
            # gradients as views of DDP's buckets: no copy into the buckets, no second gradient buffer
            self.wrapped = _DDP(self.model, device_ids=[env.device] if env.device.type == "cuda" else None,
                                find_unused_parameters=find_unused_parameters, gradient_as_bucket_view=True)
        self.optimizer = build_optimizer(self.model, cfg.optimizer, cfg.optimization.lr)
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.schedule = build_lr_schedule(cfg)
        self.amp_dtype = resolve_precision(cfg, env.device)
        self.scaler = None
        if self.amp_dtype == torch.float16:
            window = max(1, 2**14 // (env.world_size * cfg.optimization.update_freq))  # fairseq's scale window
            self.scaler = torch.amp.GradScaler("cuda", init_scale=float(cfg.common.fp16_init_scale),
                                               growth_interval=window)
        if cfg.common.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
        elif env.device.type == "cuda" and self.amp_dtype is None:
            # fp32 training: TF32 matmuls and convolutions. Under autocast the network's matmuls are bf16 /
            # fp16 already and TF32 would only touch the parts kept in fp32 on purpose, so it stays off; the
            # losses' logits never use it (utils.device.fp32_matmul)
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.num_updates = 0
        self.nonfinite_total = 0  # updates skipped for a non-finite loss/gradient
        self.nonfinite_streak = 0
        self.overflows = 0  # fp16 updates skipped by the loss scaler
        self._set_num_updates(0)

    # ---------------------------------------------------------------------------------------------
    def _set_num_updates(self, n: int) -> None:
        self.num_updates = n
        if hasattr(self.model, "set_num_updates"):
            self.model.set_num_updates(n)

    def lr(self) -> float:
        return self.schedule(self.num_updates)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.env.device.type, dtype=self.amp_dtype)

    def _forward(self, batch: dict[str, Any], seed: int, model: nn.Module) -> tuple[Any, torch.Tensor]:
        seed_everything(seed)
        batch = move_to_device(batch, self.env.device)
        with self.autocast():
            out = self.objective(model, batch)
        return out, out.loss.float()

    @staticmethod
    def _log_values(out: Any, loss: torch.Tensor, batch: dict[str, Any], keys: list[str]) -> list[Any]:
        """[loss, sample_size, audio_samples, nsentences, *logs] of one micro-batch, logs weighted by the
        sample size: each a float64 device tensor or a host float, as the objective gave it. Nothing is copied
        to the device here (``torch.tensor(x, device=cuda)`` would wait for the device)."""

        def value(v: Any) -> Any:
            return v.detach().double() if isinstance(v, torch.Tensor) else float(v)

        ss = value(out.sample_size)
        vals = [value(loss), ss, float(batch.get("audio_samples", 0)), float(len(batch["source"]))]
        for k in keys:
            v = value(out.logs[k])
            vals.append(v if k in SUM_KEYS else v * ss)
        return vals

    def _vector(self, values: list[Any]) -> torch.Tensor:
        """``values`` (device tensors and host floats) as one float64 vector on the device, without waiting
        for the device: a host float becomes a ``torch.full`` (the value is a kernel argument, not a copy)."""
        dev = self.env.device
        return torch.stack([v.to(dev, non_blocking=True) if isinstance(v, torch.Tensor) else
                            torch.full((), v, dtype=torch.float64, device=dev) for v in values])

    @staticmethod
    def _stats(totals: list[float], keys: list[str]) -> dict[str, float]:
        loss_sum, ss, audio, nsent = totals[:4]
        stats = {"loss": loss_sum / max(ss, 1.0), "sample_size": ss, "audio_samples": audio, "nsentences": nsent}
        for k, v in zip(keys, totals[4:]):
            stats[k] = v if k in SUM_KEYS else v / max(ss, 1.0)
        return stats

    # ---------------------------------------------------------------------------------------------
    def train_step(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        """One update from ``samples`` (this rank's micro-batches). Returns the reduced stats, with
        ``skipped`` true when the update was skipped (non-finite) and ``lr``, ``grad_norm``."""
        self.model.train()
        self._set_num_updates(self.num_updates)
        W, rank = self.env.world_size, self.env.rank
        acc, keys = None, None
        for j, batch in enumerate(samples):
            last = j == len(samples) - 1
            sync = contextlib.nullcontext() if last or not self.env.distributed else self.wrapped.no_sync()
            with sync:
                seed = micro_batch_seed(self.cfg.common.seed, self.num_updates, j * W + rank)
                out, loss = self._forward(batch, seed, self.wrapped)
                (self.scaler.scale(loss) if self.scaler else loss).backward()
            if keys is None:
                keys = sorted(out.logs)
            vals = self._log_values(out, loss, batch, keys)
            acc = vals if acc is None else [a + v for a, v in zip(acc, vals)]
        stats = self._stats(all_reduce_sum(self._vector(acc)).tolist(), keys)  # the update's one host sync
        lr = self.lr()
        stats.update(lr=lr, skipped=False, grad_norm=float("nan"))
        if not math.isfinite(stats["loss"]):
            return self._skip(stats, "loss")

        factor = W / max(stats["sample_size"], 1.0)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        grads = [p.grad for p in self.params if p.grad is not None]
        norm = float(torch.nn.utils.get_total_norm(grads)) * factor if grads else 0.0
        stats["grad_norm"] = norm
        if not math.isfinite(norm):
            if self.scaler is not None:  # fp16 overflow: the scaler halves its scale, no update
                self.scaler.update()
                self.optimizer.zero_grad(set_to_none=True)
                self.overflows += 1
                stats.update(skipped=True, overflow=True, loss_scale=self.scaler.get_scale())
                if self.scaler.get_scale() < self.cfg.common.min_loss_scale:
                    raise NonFiniteError(
                        f"fp16 loss scale fell below common.min_loss_scale={self.cfg.common.min_loss_scale} at update "
                        f"{self.num_updates}: the loss is probably exploding; lower optimization.lr, set "
                        "optimization.clip_norm, raise the batch size, or use common.bf16=true")
                return stats
            return self._skip(stats, "gradient")

        clip = self.cfg.optimization.clip_norm
        coef = factor * (min(1.0, clip / (norm + 1e-6)) if clip > 0 else 1.0)
        if grads:
            torch._foreach_mul_(grads, coef)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
            stats["loss_scale"] = self.scaler.get_scale()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.nonfinite_streak = 0
        if hasattr(self.model, "update_teacher"):  # self-distillation: the EMA step after the update
            self.model.update_teacher(self.num_updates + 1)
        self._set_num_updates(self.num_updates + 1)
        return stats

    def _skip(self, stats: dict[str, Any], what: str) -> dict[str, Any]:
        self.optimizer.zero_grad(set_to_none=True)
        self.nonfinite_total += 1
        self.nonfinite_streak += 1
        stats.update(skipped=True, nonfinite=what)
        limit = self.cfg.optimization.max_consecutive_nonfinite
        if self.nonfinite_streak >= limit:
            raise NonFiniteError(
                f"{self.nonfinite_streak} consecutive updates had a non-finite {what} (at update {self.num_updates}; "
                f"optimization.max_consecutive_nonfinite={limit}); training diverged: lower optimization.lr, set "
                "optimization.clip_norm, lengthen lr_scheduler.warmup_updates, or resume from an earlier checkpoint")
        return stats

    @torch.no_grad()
    def validate(self, batches: Iterable[dict[str, Any]]) -> Optional[dict[str, float]]:
        """Loss and logs over this rank's ``batches``, reduced over ranks (None if no batch anywhere)."""
        self.model.eval()
        acc, keys, n = None, None, 0
        for i, batch in enumerate(batches):
            # the bare model: ranks may hold different numbers of batches, so no DDP collectives here
            seed = micro_batch_seed(self.cfg.common.seed, VALID_STREAM, i * self.env.world_size + self.env.rank)
            out, loss = self._forward(batch, seed, self.model)
            keys = keys or sorted(out.logs)
            vals = self._log_values(out, loss, batch, keys)
            acc = vals if acc is None else [a + v for a, v in zip(acc, vals)]
            n += 1
        local = (keys, self._vector(acc).tolist()) if acc is not None else None
        parts = [p for p in all_gather_object(local) if p is not None]
        if not parts:
            return None
        keys = parts[0][0]
        totals = np.sum([p[1] for p in parts], axis=0).tolist()
        stats = self._stats(totals, keys)
        if hasattr(self.objective, "derived_metrics"):  # e.g. CTC: wer/cer from the summed error counts
            stats.update(self.objective.derived_metrics(stats))
        return stats

    # ---------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else {},
            "num_updates": self.num_updates,
            "nonfinite_total": self.nonfinite_total,
            "overflows": self.overflows,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.nonfinite_total = int(state.get("nonfinite_total", 0))
        self.overflows = int(state.get("overflows", 0))
        self._set_num_updates(int(state["num_updates"]))
