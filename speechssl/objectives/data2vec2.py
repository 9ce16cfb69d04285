"""data2vec 2.0 objective: regression of the teacher's targets at the masked frames.

fairseq's ``d2v_loss`` summed by its ``model`` criterion, in fp32::

    loss = sum over the masked frames n of every masked copy, and channels d, of  e(pred[n, d] - targets[n, d]) * scale

with ``e`` the squared error (``loss_beta`` 0) or smooth L1 with ``beta = loss_beta``, and ``scale =
loss_scale`` or ``1 / sqrt(D)`` when null; ``sample_size`` = the number of masked frames (all copies), so the
logged ``loss`` is per masked frame. Logs (fairseq's ``log_keys``): ``target_var`` and ``pred_var``, the
standard deviation over the masked frames of each channel, ``sqrt(var + 1e-6)``, averaged over the channels
(``compute_var``; a falling ``target_var`` is the teacher collapsing to a constant: see the health alarm);
``ema_decay`` (the teacher's decay at this update; fairseq logs it times 1000); ``masked_pct``. The frame
count is a host integer (the shapes): nothing waits for the device.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from speechssl.objectives.output import LossOutput


def channel_std(y: Tensor) -> Tensor:
    """fairseq's ``compute_var``: ``sqrt(var_n(y[n, d]) + 1e-6)`` (unbiased) averaged over channels ``d``;
    ``y (..., D)`` fp32. A 0-d tensor."""
    y = y.reshape(-1, y.shape[-1])
    return torch.sqrt(y.var(dim=0) + 1e-6).mean()


class Data2Vec2Criterion:
    """The data2vec 2.0 loss. ``criterion(model, batch)`` runs ``model(batch["source"],
    padding_mask=batch.get("padding_mask"))`` and returns :class:`LossOutput`; :meth:`compute` does the same
    from an existing model output.

    Args:
        loss_beta: 0 for the squared error, > 0 for smooth L1 with this beta (``model.loss_beta``).
        loss_scale: per-element scale (``model.loss_scale``); None: ``1 / sqrt(D)``.
    """

    def __init__(self, loss_beta: float = 0.0, loss_scale: Optional[float] = None):
        if loss_beta < 0:
            raise ValueError(f"model.loss_beta must be >= 0, got {loss_beta}")
        self.loss_beta = loss_beta
        self.loss_scale = loss_scale

    def __call__(self, model: nn.Module, batch: Mapping[str, Any]) -> LossOutput:
        return self.compute(model(batch["source"], padding_mask=batch.get("padding_mask")))

    def compute(self, out: Mapping[str, Any]) -> LossOutput:
        """Loss from a :class:`~speechssl.models.data2vec2.Data2Vec2Model` pretraining output."""
        pred, targets = out["pred"], out["targets"]
        D = pred.shape[-1]
        with torch.autocast(device_type=pred.device.type, enabled=False):
            p = pred.reshape(-1, D).float()
            y = targets.reshape(-1, D).float()
            if self.loss_beta == 0:
                err = F.mse_loss(p, y, reduction="sum")
            else:
                err = F.smooth_l1_loss(p, y, reduction="sum", beta=self.loss_beta)
            scale = self.loss_scale if self.loss_scale is not None else 1.0 / math.sqrt(D)
            loss = err * scale
            with torch.no_grad():
                logs: dict[str, Any] = {"target_var": channel_std(y), "pred_var": channel_std(p.detach()),
                                        "ema_decay": float(out["ema_decay"]), "masked_pct": float(out["masked_pct"]),
                                        "num_masked": p.shape[0]}
        return LossOutput(loss=loss, sample_size=p.shape[0], logs=logs)
