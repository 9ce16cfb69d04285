"""Beam search with an optional lexicon and KenLM n-gram language model: torchaudio's flashlight decoder.

The decoder itself is built by :func:`speechssl._torchaudio.ctc_beam_decoder` (every torchaudio call
lives there); this module maps a :class:`~speechssl.text.vocab.Vocabulary` onto it and returns texts.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from speechssl.text.vocab import SPECIALS, Vocabulary


class FlashlightDecoder:
    """``decoder(logits (B, L, V), lengths (B,)) -> list[str]``.

    Args:
        vocab: the model's output vocabulary (blank ``<s>``; letters use ``|`` as the word separator).
        lexicon: file of ``WORD s p e l l i n g |`` lines restricting the output to its words (optional).
        lm: KenLM model (ARPA or binary), optional; with a lexicon, word-level LM.
        beam_size, lm_weight, word_score: the usual flashlight settings.
    """

    def __init__(self, vocab: Vocabulary, lexicon: Optional[str] = None, lm: Optional[str] = None,
                 beam_size: int = 50, lm_weight: float = 2.0, word_score: float = 0.0):
        from speechssl._torchaudio import ctc_beam_decoder

        self.vocab = vocab
        sil = "|" if vocab.kind == "letter" else SPECIALS[1]
        self.decoder = ctc_beam_decoder(
            list(vocab.symbols), lexicon=lexicon, lm=lm, beam_size=beam_size, lm_weight=lm_weight,
            word_score=word_score, blank_token=vocab.symbols[0], sil_token=sil, unk_word=SPECIALS[3])

    def __call__(self, logits: Tensor, lengths: Optional[Tensor] = None) -> list[str]:
        lprobs = torch.log_softmax(logits.float(), dim=-1).cpu().contiguous()
        lens = None if lengths is None else lengths.to(torch.int32).cpu()
        results = self.decoder(lprobs, lens)
        out = []
        for hyps in results:
            if not hyps:
                out.append("")
                continue
            best = hyps[0]
            if best.words:  # lexicon decoding gives words
                out.append(" ".join(best.words))
            else:
                ids = [i for i in best.tokens.tolist()]
                out.append(self.vocab.decode(_collapse(ids)))
        return out


def _collapse(ids: list[int], blank: int = 0) -> list[int]:
    out, prev = [], None
    for i in ids:
        if i != prev and i != blank:
            out.append(i)
        prev = i
    return out
