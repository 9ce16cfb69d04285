"""wav2vec 2.0 objective: InfoNCE over quantized targets + diversity loss + feature penalty.

fairseq semantics (``Wav2Vec2Model.sample_negatives`` / ``compute_preds`` and the ``wav2vec`` criterion):

* targets ``y`` are taken at the M masked frames of each utterance only (every utterance has the same M);
* for each masked frame, K distractors are drawn uniformly, with replacement, from the OTHER M - 1
  masked targets of the same utterance (draw from ``[0, M - 1)`` and shift indices ``>= self`` by one,
  so the positive itself is never drawn);
* logits = cosine(pred, [positive, distractors]) / logit_temp in IEEE fp32 (never TF32: the 1 / logit_temp
  scaling would amplify its error, see :func:`~speechssl.utils.device.fp32_matmul`); distractors identical to the
  positive are set to -inf (fairseq's ``neg_is_pos``; identity is decided on the quantizer codes, which
  is exact, instead of comparing float vectors);
* loss = SUM over masked frames of cross-entropy (positive = class 0)
  + w_div * (G*V - prob_perplexity) / (G*V) * sample_size + w_pen * mean(conv_features**2) * sample_size.

Efficiency: cosine similarities of every prediction against every target of its utterance are one
``(B, M, M)`` batched matmul of L2-normalised vectors; positives are its diagonal and distractor logits a
``gather`` of it, so the ``(B, M, K, final_dim)`` tensor of gathered distractor vectors is never built.
Negative sampling runs on the model's device.

transformers' ``Wav2Vec2ForPreTraining`` computes the same contrastive and diversity terms (its diversity
term uses the hard-code perplexity in eval mode, and it has no feature penalty).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from speechssl.objectives.output import LossOutput
from speechssl.utils.device import fp32_matmul


def sample_negatives(num_utterances: int, num_targets: int, num_negatives: int,
                     device: Optional[torch.device | str] = None,
                     generator: Optional[torch.Generator] = None) -> Tensor:
    """Distractor indices ``(B, M, K)`` int64 in ``[0, M)``, never equal to their own position ``m``."""
    if num_targets < 2:
        raise ValueError(f"negatives need at least 2 masked frames per utterance, got {num_targets}; "
                         "use longer inputs (task.min_sample_size) or a higher model.mask_prob")
    shape = (num_utterances, num_targets, num_negatives)
    idx = torch.randint(0, num_targets - 1, shape, device=device, generator=generator)
    own = torch.arange(num_targets, device=idx.device).view(1, -1, 1)
    return idx + (idx >= own).long()


def contrastive_logits(pred: Tensor, targets: Tensor, negative_indices: Tensor, logit_temp: float,
                       codes: Optional[Tensor] = None) -> Tensor:
    """InfoNCE logits ``(B, M, 1 + K)`` in fp32: column 0 the positive, then the K distractors.

    Args:
        pred: ``(B, M, F)`` context projections at the masked frames.
        targets: ``(B, M, F)`` projected quantized targets at the same frames.
        negative_indices: ``(B, M, K)`` indices into each utterance's M targets (:func:`sample_negatives`).
        codes: ``(B, M, G)`` quantizer indices of the targets (identical codes = identical targets);
            None compares the target vectors exactly.
    """
    B, M, _ = pred.shape
    with torch.autocast(device_type=pred.device.type, enabled=False):
        p = F.normalize(pred.float(), dim=-1, eps=1e-8)
        t = F.normalize(targets.float(), dim=-1, eps=1e-8)
        sim = fp32_matmul(p, t.transpose(1, 2))  # (B, M, M): sim[b, i, j] = cos(pred_i, target_j); never TF32
        positive = sim.diagonal(dim1=1, dim2=2).unsqueeze(-1)
        logits = torch.cat([positive, sim.gather(2, negative_indices)], dim=-1) / logit_temp
    if codes is None:  # ids shared exactly by identical vectors
        codes = torch.unique(targets.detach().reshape(B * M, -1), dim=0, return_inverse=True)[1].view(B, M, 1)
    same = (codes.unsqueeze(2) == codes.unsqueeze(1)).all(dim=-1)  # (B, M, M)
    neg_is_pos = same.gather(2, negative_indices)
    neg_is_pos = F.pad(neg_is_pos, (1, 0), value=False)
    return logits.masked_fill(neg_is_pos, float("-inf"))


class Wav2Vec2Criterion:
    """The wav2vec 2.0 pretraining loss (fairseq's ``wav2vec`` criterion with ``infonce=True``).

    ``criterion(model, batch)`` runs ``model(batch["source"], padding_mask=batch.get("padding_mask"))``
    and returns :class:`LossOutput`; :meth:`compute` does the same from an existing model output.

    Args:
        num_negatives: distractors per masked frame (``model.num_negatives``, 100).
        logit_temp: ``model.logit_temp`` (0.1).
        diversity_weight: weight of ``(G*V - prob_perplexity) / (G*V)`` (``criterion.loss_weights[0]``).
        feature_pen_weight: weight of the feature penalty (``criterion.loss_weights[1]``).
        generator: optional ``torch.Generator`` (on the model's device) for the negatives.
    """

    def __init__(self, num_negatives: int = 100, logit_temp: float = 0.1, diversity_weight: float = 0.1,
                 feature_pen_weight: float = 10.0, generator: Optional[torch.Generator] = None):
        if num_negatives < 1:
            raise ValueError(f"model.num_negatives must be >= 1, got {num_negatives}")
        self.num_negatives = num_negatives
        self.logit_temp = logit_temp
        self.diversity_weight = diversity_weight
        self.feature_pen_weight = feature_pen_weight
        self.generator = generator

    def __call__(self, model: nn.Module, batch: Mapping[str, Any]) -> LossOutput:
        out = model(batch["source"], padding_mask=batch.get("padding_mask"))
        return self.compute(out)

    def compute(self, out: Mapping[str, Any], negative_indices: Optional[Tensor] = None) -> LossOutput:
        """Loss from a model output dict; ``negative_indices`` ``(B, M, K)`` overrides the sampling."""
        pred, targets = out["pred"], out["targets"]
        B, M, _ = pred.shape
        if negative_indices is None:
            negative_indices = sample_negatives(B, M, self.num_negatives, pred.device, self.generator)
        logits = contrastive_logits(pred, targets, negative_indices, self.logit_temp, out.get("codes"))
        flat = logits.view(B * M, -1)
        sample_size = B * M
        with torch.autocast(device_type=pred.device.type, enabled=False):
            nce = F.cross_entropy(flat, torch.zeros(B * M, dtype=torch.long, device=flat.device), reduction="sum")
            loss = nce
            feature_pen = out["features_pen"].float()
            if self.feature_pen_weight != 0:
                loss = loss + self.feature_pen_weight * feature_pen * sample_size
            diversity = None
            if out.get("prob_perplexity") is not None:
                num_vars = out["num_vars"]
                diversity = (num_vars - out["prob_perplexity"].float()) / num_vars
                if self.diversity_weight != 0:
                    loss = loss + self.diversity_weight * diversity * sample_size
        with torch.no_grad():
            top = flat.argmax(dim=-1) == 0
            tie = top & (flat.argmin(dim=-1) == 0)  # all logits equal: not a correct ranking
            accuracy = (top.sum() - tie.sum()).float() / max(B * M, 1)
        logs: dict[str, Any] = {
            "contrastive": nce.detach() / sample_size,
            "feature_pen": feature_pen.detach(),
            "accuracy": accuracy,
            "num_masked": sample_size,
        }
        if diversity is not None:
            logs.update(diversity=diversity.detach(), code_perplexity=out["code_perplexity"].detach(),
                        prob_perplexity=out["prob_perplexity"].detach(), temp=out["temp"])
        return LossOutput(loss=loss, sample_size=sample_size, logs=logs)
