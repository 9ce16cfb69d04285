"""Training objectives. ``build_objective(cfg.criterion, cfg.model)`` is what the trainer calls.

Every objective is a callable ``objective(model, batch) -> LossOutput`` (see :class:`LossOutput` for
the fairseq sum-over-units convention).
"""

from __future__ import annotations

from typing import Any

from speechssl.config import CriterionConfig, ModelConfig
from speechssl.objectives.data2vec2 import Data2Vec2Criterion
from speechssl.objectives.contrastive import Wav2Vec2Criterion, contrastive_logits, sample_negatives
from speechssl.objectives.hubert import HubertCriterion
from speechssl.objectives.output import LossOutput

OBJECTIVE_NAMES = ("wav2vec", "hubert", "data2vec2")


def _wav2vec_weights(loss_weights: list[float]) -> tuple[float, float]:
    """criterion.loss_weights -> (diversity, feature penalty); one value applies to both (fairseq)."""
    if len(loss_weights) == 0:
        return 0.0, 0.0
    if len(loss_weights) == 1:
        return loss_weights[0], loss_weights[0]
    if len(loss_weights) == 2:
        return loss_weights[0], loss_weights[1]
    raise ValueError(f"criterion.loss_weights has {len(loss_weights)} values; wav2vec 2.0 has two extra "
                     "losses: [diversity, feature_penalty] (e.g. [0.1, 10.0])")


def build_objective(criterion_cfg: CriterionConfig, model_cfg: ModelConfig) -> Any:
    """The objective named by ``criterion.name``, configured from the criterion and model sections."""
    if criterion_cfg.name == "wav2vec":
        if not criterion_cfg.infonce:
            raise ValueError("criterion.infonce=false (wav2vec 1.0's binary loss) is not supported; "
                             "wav2vec 2.0 uses infonce: true")
        if model_cfg.name != "wav2vec2":
            raise ValueError(f"criterion.name 'wav2vec' needs model.name 'wav2vec2', got '{model_cfg.name}'")
        diversity, feature_pen = _wav2vec_weights(list(criterion_cfg.loss_weights))
        return Wav2Vec2Criterion(model_cfg.num_negatives, model_cfg.logit_temp, diversity, feature_pen)
    if criterion_cfg.name == "hubert":
        if model_cfg.name != "hubert":
            raise ValueError(f"criterion.name 'hubert' needs model.name 'hubert', got '{model_cfg.name}'")
        weights = list(criterion_cfg.loss_weights)
        if len(weights) > 1:
            raise ValueError(f"criterion.loss_weights has {len(weights)} values; HuBERT has one extra loss: "
                             "[feature_penalty] (e.g. [10.0])")
        return HubertCriterion(criterion_cfg.pred_masked_weight, criterion_cfg.pred_nomask_weight,
                               weights[0] if weights else 0.0)
    if criterion_cfg.name == "data2vec2":
        if model_cfg.name != "data2vec2":
            raise ValueError(f"criterion.name 'data2vec2' needs model.name 'data2vec2', got '{model_cfg.name}'")
        return Data2Vec2Criterion(model_cfg.loss_beta, model_cfg.loss_scale)
    raise ValueError(f"unknown criterion.name '{criterion_cfg.name}'; available: {', '.join(OBJECTIVE_NAMES)}")


__all__ = ["Data2Vec2Criterion", "HubertCriterion", "LossOutput", "OBJECTIVE_NAMES", "Wav2Vec2Criterion", "build_objective",
           "contrastive_logits", "sample_negatives"]
