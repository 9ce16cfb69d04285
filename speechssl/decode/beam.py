"""CTC prefix beam search in plain Python + torch: beam decoding that needs no optional package.

The standard algorithm (Hannun et al., 2014, without a language model): for every prefix keep the
log-probability of all alignments of the frames so far that collapse to it and end in a blank (``pb``)
or in its last symbol (``pnb``); per frame extend each prefix by the ``token_beam`` most likely symbols
(plus its own last symbol, which may continue without extending), merge identical prefixes, keep the
``beam_size`` most probable. The result maximises the summed probability of a label sequence over its
alignments, which greedy decoding (the single best alignment) only approximates: with ``beam_size`` large
enough it is never less probable than the greedy output.

For lexicon / KenLM decoding see :func:`speechssl.decode.flashlight_decoder` (torchaudio + flashlight-text).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

NEG_INF = float("-inf")


def _logaddexp(a: float, b: float) -> float:
    if a == NEG_INF:
        return b
    if b == NEG_INF:
        return a
    if a > b:
        return a + math.log1p(math.exp(b - a))
    return b + math.log1p(math.exp(a - b))


def prefix_beam_search(log_probs: Tensor, beam_size: int = 10, token_beam: Optional[int] = None,
                       blank: int = 0) -> list[tuple[list[int], float]]:
    """Decode one utterance.

    Args:
        log_probs: ``(L, V)`` log-probabilities (log-softmax of the logits) of its valid frames.
        beam_size: prefixes kept per frame.
        token_beam: symbols tried per frame (the most likely ones; default ``min(V, beam_size + 1)``).
        blank: blank index.

    Returns the ``beam_size`` best ``(symbol ids, log-probability)`` pairs, best first.
    """
    lp = log_probs.detach().float().cpu()
    L, V = lp.shape
    k = min(V, token_beam or beam_size + 1)
    top = lp.topk(k, dim=1).indices.tolist()
    rows = lp.tolist()
    beams: dict[tuple[int, ...], list[float]] = {(): [0.0, NEG_INF]}  # prefix -> [pb, pnb]
    for t in range(L):
        row = rows[t]
        nxt: dict[tuple[int, ...], list[float]] = {}

        def slot(prefix: tuple[int, ...]) -> list[float]:
            s = nxt.get(prefix)
            if s is None:
                s = nxt[prefix] = [NEG_INF, NEG_INF]
            return s

        for prefix, (pb, pnb) in beams.items():
            total = _logaddexp(pb, pnb)
            s = slot(prefix)
            s[0] = _logaddexp(s[0], total + row[blank])  # stay, ending in blank
            last = prefix[-1] if prefix else None
            if last is not None:  # stay: the last symbol continues (collapses)
                s[1] = _logaddexp(s[1], pnb + row[last])
            for c in top[t]:
                if c == blank:
                    continue
                ext = slot(prefix + (c,))
                # a repeat of the last symbol is a new symbol only after a blank
                ext[1] = _logaddexp(ext[1], (pb if c == last else total) + row[c])
        ranked = sorted(nxt.items(), key=lambda kv: _logaddexp(*kv[1]), reverse=True)[:beam_size]
        beams = dict(ranked)
    out = [(list(p), _logaddexp(*s)) for p, s in beams.items()]
    out.sort(key=lambda x: x[1], reverse=True)
    return out


def beam_decode(logits: Tensor, lengths: Optional[Tensor] = None, beam_size: int = 10,
                token_beam: Optional[int] = None, blank: int = 0) -> list[list[int]]:
    """Best prefix-beam-search hypothesis per utterance of ``logits (B, L, V)``."""
    lprobs = torch.log_softmax(logits.float(), dim=-1)
    B, L = lprobs.shape[:2]
    lens = lengths.tolist() if lengths is not None else [L] * B
    return [prefix_beam_search(lprobs[b, : lens[b]], beam_size, token_beam, blank)[0][0] for b in range(B)]


def sequence_log_prob(log_probs: Tensor, labels: list[int], blank: int = 0) -> float:
    """``log p(labels | frames)`` summed over all CTC alignments (``-ctc_loss``) of one utterance."""
    if not labels:
        return float(log_probs[:, blank].sum())
    loss = torch.nn.functional.ctc_loss(
        log_probs.float()[:, None, :], torch.tensor([labels]), torch.tensor([log_probs.shape[0]]),
        torch.tensor([len(labels)]), blank=blank, reduction="sum", zero_infinity=False)
    return -float(loss)
