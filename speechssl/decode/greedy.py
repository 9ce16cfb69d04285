"""Batched greedy (best-path) CTC decoding.

Per frame take the most likely symbol, then apply the CTC collapse rules: merge runs of the same symbol,
then drop blanks. A symbol repeated across a blank (``a _ a``) is two symbols; ``a a`` is one.
Everything is vectorized over the batch; only the final split into per-utterance lists is per item.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def collapse_mask(ids: Tensor, lengths: Optional[Tensor] = None, blank: int = 0) -> Tensor:
    """``ids (B, L)`` frame symbols -> bool ``(B, L)``, True at the frames that emit a symbol:
    not blank, not a repeat of the previous frame, and within the first ``lengths[b]`` frames."""
    prev = torch.full_like(ids[:, :1], -1)
    keep = (ids != blank) & (ids != torch.cat([prev, ids[:, :-1]], dim=1))
    if lengths is not None:
        keep &= torch.arange(ids.shape[1], device=ids.device)[None, :] < lengths[:, None]
    return keep


def greedy_decode(logits: Tensor, lengths: Optional[Tensor] = None, blank: int = 0) -> list[list[int]]:
    """``logits (B, L, V)`` (or log-probabilities, or already ``(B, L)`` argmax ids) -> symbol ids per
    utterance after the CTC collapse rules. ``lengths (B,)``: valid frames of each utterance."""
    ids = logits.argmax(dim=-1) if logits.dim() == 3 else logits
    keep = collapse_mask(ids, lengths, blank)
    counts = keep.sum(dim=1).tolist()
    flat = ids[keep].tolist()
    out, start = [], 0
    for n in counts:
        out.append(flat[start:start + n])
        start += n
    return out


def count_emitted(logits: Tensor, lengths: Optional[Tensor] = None, blank: int = 0) -> Tensor:
    """Number of symbols greedy decoding emits in the whole batch (0-d long tensor, no host sync)."""
    ids = logits.argmax(dim=-1) if logits.dim() == 3 else logits
    return collapse_mask(ids, lengths, blank).sum()
