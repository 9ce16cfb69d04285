"""HuBERT objective: cross-entropy of cluster labels at masked (and optionally unmasked) frames.

fairseq's ``hubert`` criterion (``fairseq/criterions/hubert_criterion.py``), in fp32::

    loss = pred_masked_weight * sum_i CE_sum(logit_m_list[i], target_m_list[i])
         + pred_nomask_weight * sum_i CE_sum(logit_u_list[i], target_u_list[i])
         + feature_pen_weight * features_pen * sample_size

``sample_size`` = masked frames (when ``pred_masked_weight > 0``) + unmasked frames (when
``pred_nomask_weight > 0``); the trainer divides the summed loss by it. Logs (per frame, nats):
``loss_m`` / ``loss_u`` (summed over label sets, per unit of sample size), ``accuracy`` = correct / count
over the masked frames of every label set (the health monitor compares it with chance, 1/K), and
``accuracy_unmasked`` the same over unmasked frames when they are predicted (averaged per batch). With
``pred_nomask_weight`` 0 (HuBERT's setting) the model is asked for no unmasked logits at all (fairseq
computes them for its log only), so there is no ``loss_u`` / ``accuracy_unmasked`` then. Frame counts and
``sample_size`` are host integers (the shapes of the gathered logits): nothing waits for the device.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from speechssl.objectives.output import LossOutput


def _ce_and_correct(logits: list[Optional[Tensor]], targets: list[Optional[Tensor]]) -> tuple[Tensor, Tensor, int]:
    """Summed cross-entropy, number of correct argmax predictions and count over every label set."""
    loss = correct = None
    count = 0
    for lg, tg in zip(logits, targets):
        if lg is None:
            continue
        ce = F.cross_entropy(lg.float(), tg, reduction="sum")
        ok = (lg.detach().argmax(dim=-1) == tg).sum()
        loss = ce if loss is None else loss + ce
        correct = ok if correct is None else correct + ok
        count += tg.numel()
    return loss, correct, count


class HubertCriterion:
    """The HuBERT pretraining loss. ``criterion(model, batch)`` runs
    ``model(batch["source"], padding_mask=batch.get("padding_mask"), target_list=batch["target_list"])``
    and returns :class:`LossOutput`; :meth:`compute` does the same from an existing model output.

    Args:
        pred_masked_weight: weight of the loss at masked frames (1.0).
        pred_nomask_weight: weight of the loss at unmasked frames (0.0).
        feature_pen_weight: weight of the feature penalty (``criterion.loss_weights[0]``, 10).
    """

    def __init__(self, pred_masked_weight: float = 1.0, pred_nomask_weight: float = 0.0,
                 feature_pen_weight: float = 10.0):
        if pred_masked_weight <= 0 and pred_nomask_weight <= 0:
            raise ValueError("criterion.pred_masked_weight and criterion.pred_nomask_weight are both 0: nothing to "
                             "learn; HuBERT uses pred_masked_weight 1.0, pred_nomask_weight 0.0")
        self.pred_masked_weight = pred_masked_weight
        self.pred_nomask_weight = pred_nomask_weight
        self.feature_pen_weight = feature_pen_weight

    def __call__(self, model: nn.Module, batch: Mapping[str, Any]) -> LossOutput:
        if "target_list" not in batch:
            raise ValueError("the HuBERT objective needs batch['target_list'] (label tensors): use "
                             "task.name=hubert_pretraining with task.labels=[km]")
        out = model(batch["source"], padding_mask=batch.get("padding_mask"), target_list=batch["target_list"],
                    skip_nomask=True if self.pred_nomask_weight <= 0 else None)
        return self.compute(out)

    def compute(self, out: Mapping[str, Any]) -> LossOutput:
        """Loss from a :class:`~speechssl.models.hubert.HubertModel` output dict."""
        device = out["features_pen"].device
        with torch.autocast(device_type=device.type, enabled=False):
            loss_m, correct_m, count_m = _ce_and_correct(out["logit_m_list"], out["target_m_list"])
            loss_u, correct_u, count_u = _ce_and_correct(out["logit_u_list"], out["target_u_list"])
            n_sets = max(len(out["logit_m_list"]), 1)
            zero = torch.zeros((), device=device)
            loss, sample_size = zero, 0
            if self.pred_masked_weight > 0:
                if loss_m is None:
                    raise ValueError("criterion.pred_masked_weight > 0 but the model skips masked frames "
                                     "(model.skip_masked=true)")
                loss = loss + self.pred_masked_weight * loss_m
                sample_size += count_m // n_sets
            if self.pred_nomask_weight > 0:
                if loss_u is None:
                    raise ValueError("criterion.pred_nomask_weight > 0 but the model skips unmasked frames "
                                     "(model.skip_nomask=true)")
                loss = loss + self.pred_nomask_weight * loss_u
                sample_size += count_u // n_sets
            feature_pen = out["features_pen"].float()
            if self.feature_pen_weight != 0:
                loss = loss + self.feature_pen_weight * feature_pen * sample_size
        logs: dict[str, Any] = {"feature_pen": feature_pen.detach(), "num_masked": count_m // n_sets}
        denom = max(sample_size, 1)
        if loss_m is not None:
            # per-frame values, so that the trainer's sample-size weighting gives sum / total frames
            logs["loss_m"] = loss_m.detach() / denom
            logs["accuracy"] = correct_m.float() / max(count_m, 1)
        if loss_u is not None:
            logs["loss_u"] = loss_u.detach() / denom
            logs["accuracy_unmasked"] = correct_u.float() / max(count_u, 1)
        return LossOutput(loss=loss, sample_size=sample_size, logs=logs)
