"""CTC objective for ASR fine-tuning (fairseq's ``ctc`` criterion).

``loss`` is the SUM over utterances of ``-log p(target | audio)`` computed in fp32 (log-softmax and
``ctc_loss`` outside autocast: reduced precision gives NaN/inf), with ``zero_infinity`` zeroing the
loss of utterances whose target cannot fit in their frames. ``sample_size`` is the number of target
tokens (or of utterances with ``optimization.sentence_avg``), so the logged ``loss`` is per token.

Logs: ``ntokens``; ``emit_ratio`` = symbols greedy decoding emits / target tokens (near 0: the model
outputs only blanks, see the health alarm); ``frame_std_ratio`` (:func:`frame_std_ratio`: how much the
output changes from frame to frame; near 0: the encoder collapsed onto one output for every frame, which
CTC's all-blank plateau is not left from); in evaluation mode also the error counts ``w_errors``,
``w_total``, ``c_errors``, ``c_total`` of greedy decoding, from which :meth:`derived_metrics` gives the
validation ``wer`` and ``cer`` (percent) summed over all validation batches and processes.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F

from speechssl.decode.greedy import count_emitted, greedy_decode
from speechssl.decode.metrics import utterance_errors
from speechssl.objectives.output import LossOutput
from speechssl.text.vocab import BLANK, Vocabulary


def frame_std_ratio(logits: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """How much the output changes over time, relative to its spread over the vocabulary (0-d tensor).

    ``logits (B, L, V)``, ``lengths (B,)`` valid frames: the standard deviation over the valid frames of each
    utterance (averaged over symbols and utterances) divided by the standard deviation over the symbols (averaged
    over the valid frames). Fine-tuned models that read their input give 0.63-0.70 on the demo corpus; encoders
    that collapsed towards one output for every frame give 0.01-0.18 (the demo's log-mel wav2vec 2.0 and HuBERT
    upstreams fine-tuned at too high a learning rate, stuck on CTC's all-blank plateau).
    """
    x = logits.detach().float()
    B, L, _ = x.shape
    valid = (torch.arange(L, device=x.device)[None, :] < lengths[:, None]).to(x.dtype)[..., None]  # (B, L, 1)
    n = valid.sum(1).clamp(min=2.0)  # (B, 1)
    mean_t = (x * valid).sum(1) / n  # (B, V)
    var_t = (((x - mean_t[:, None]) ** 2) * valid).sum(1) / (n - 1)  # (B, V)
    over_time = var_t.sqrt().mean()
    over_vocab = (x.std(dim=-1, keepdim=True) * valid).sum() / valid.sum().clamp(min=1.0)
    return over_time / over_vocab.clamp(min=1e-6)


class CtcCriterion:
    """``objective(model, batch) -> LossOutput`` for a :class:`~speechssl.models.ctc.Wav2VecCtc`.

    ``batch`` needs ``source``, ``padding_mask``, ``target`` ``(B, S)`` (padded with ``<pad>``),
    ``target_lengths`` ``(B,)`` and, for validation WER, ``target_text`` (reference words per item).
    """

    def __init__(self, vocab: Vocabulary, zero_infinity: bool = True, sentence_avg: bool = False,
                 blank_alarm_update: Optional[int] = None):
        self.vocab = vocab
        self.zero_infinity = zero_infinity
        self.sentence_avg = sentence_avg
        self.blank_alarm_update = blank_alarm_update
        self.num_updates = 0  # of the model last seen, for the validation alarm

    def __call__(self, model: Any, batch: dict[str, Any]) -> LossOutput:
        self.num_updates = int(getattr(model, "num_updates", 0))
        net = model(batch["source"], batch["padding_mask"])
        logits, lengths = net["logits"], net["lengths"]
        target, target_lengths = batch["target"], batch["target_lengths"]
        with torch.autocast(logits.device.type, enabled=False):
            lprobs = F.log_softmax(logits.float(), dim=-1).transpose(0, 1)  # (L, B, V)
            # the padded (B, S) targets as they are: ctc_loss reads the first target_lengths[b] of row b (the
            # same loss as the concatenated valid symbols, whose boolean selection would wait for the device)
            loss = F.ctc_loss(lprobs, target, lengths, target_lengths, blank=BLANK, reduction="sum",
                              zero_infinity=self.zero_infinity)
        ntokens = target_lengths.sum()
        sample_size = len(target_lengths) if self.sentence_avg else ntokens
        with torch.no_grad():
            ids = logits.argmax(dim=-1)
            emitted = count_emitted(ids, lengths)
            logs: dict[str, Any] = {"ntokens": ntokens, "emit_ratio": emitted.float() / ntokens.clamp(min=1).float(),
                                    "frame_std_ratio": frame_std_ratio(logits, lengths)}
            model_training = getattr(model, "training", True)
            if not model_training and "target_text" in batch:
                hyps = [self.vocab.decode(h) for h in greedy_decode(ids, lengths)]
                words, chars = utterance_errors(batch["target_text"], hyps)
                logs.update(w_errors=float(sum(w.errors for w in words)), w_total=float(sum(w.total for w in words)),
                            c_errors=float(sum(c.errors for c in chars)), c_total=float(sum(c.total for c in chars)))
        return LossOutput(loss=loss, sample_size=sample_size, logs=logs)

    def derived_metrics(self, stats: dict[str, float]) -> dict[str, Any]:
        """``wer`` / ``cer`` (percent) from the summed error counts of a validation pass, and an ``alarms``
        entry when validation output is still only blanks after ``blank_alarm_update`` updates."""
        out: dict[str, Any] = {}
        if stats.get("w_total"):
            out["wer"] = 100.0 * stats["w_errors"] / stats["w_total"]
        if stats.get("c_total"):
            out["cer"] = 100.0 * stats["c_errors"] / stats["c_total"]
        emit = stats.get("emit_ratio")
        if self.blank_alarm_update is not None and emit is not None and emit < 0.05 \
                and self.num_updates >= self.blank_alarm_update:
            out["alarms"] = [
                f"validation output is only blanks after {self.num_updates} updates ({100 * emit:.1f}% of the target "
                "tokens emitted). If training emits symbols (train emit_ratio), the model emits only at masked frames: "
                "a weakly pretrained upstream's unmasked outputs carry no content (pretraining scores masked frames "
                "only); fine-tune with model.apply_mask=false. Other causes: learning rate too high, upstream "
                "unfrozen too early (model.freeze_finetune_updates), a vocabulary that does not match the labels"]
        return out
