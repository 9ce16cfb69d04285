"""Span masking with fairseq's ``compute_mask_indices`` semantics, vectorized in torch on any device.

fairseq draws the spans per utterance with numpy on the host; here every step is a batched tensor
operation (random keys + ``topk`` for sampling without replacement, one ``scatter`` to paint the spans),
so masking runs on the model's device without per-utterance Python loops. The distribution is the same:

1. per utterance of ``sz`` valid (non-padded) frames, ``num = max(min_masks, int(mask_prob * sz /
   mask_length + U))`` spans, ``U ~ Uniform[0, 1)`` (probabilistic rounding; fairseq's ``num_mask_ver=2``);
2. span lengths: ``static`` = ``mask_length``; ``uniform`` ~ U{mask_other .. 2 * mask_length};
   ``normal`` = max(1, round(N(mask_length, mask_other))); ``poisson`` = round(Poisson(mask_length));
3. ``num`` distinct start frames drawn uniformly from ``[0, sz - min_len)`` (``min_len`` = shortest span;
   when that range holds no more than ``num`` starts it becomes ``[0, num + 1)``, as fairseq), spans
   clipped at ``sz`` -- padding is never masked, overlapping spans merge;
4. ``require_same_masks`` (fairseq default True): every row keeps a uniformly random subset of its
   masked frames of the size of the least-masked row, so wav2vec 2.0 can view targets as ``(B, M, C)``;
5. ``mask_dropout`` (default 0): unmask ``round(count * mask_dropout)`` random masked frames per row.

fairseq's ``no_overlap=True`` (a sequential rejection algorithm) is not provided.

No step reads a device value on the host (which would make the host wait for the device): bounds are
host-side, the subset sizes stay tensors, and a row with every valid frame masked is reported from host
counts (:func:`check_covered`), either right away (:func:`compute_mask_indices`) or by the caller of
:func:`span_mask` from values it reads anyway (the models, after queueing the Transformer: see
:class:`~speechssl.utils.device.HostCopy`).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from speechssl.utils.device import HostCopy

MASK_TYPES = ("static", "uniform", "normal", "poisson")


def _span_lengths(mask_type: str, shape: tuple[int, int], mask_length: int, mask_other: float,
                  device: torch.device, generator: Optional[torch.Generator]) -> Tensor:
    """Lengths ``(B, N)`` (int64) of candidate spans for ``mask_type``."""
    if mask_type == "static":
        return torch.full(shape, mask_length, dtype=torch.long, device=device)
    if mask_type == "uniform":
        return torch.randint(int(mask_other), mask_length * 2 + 1, shape, device=device, generator=generator)
    if mask_type == "normal":
        noise = torch.randn(shape, device=device, generator=generator)
        return (mask_length + mask_other * noise).round().clamp(min=1).long()
    if mask_type == "poisson":
        rates = torch.full(shape, float(mask_length), device=device)
        return torch.poisson(rates, generator=generator).round().long()
    raise ValueError(f"mask selection must be one of {MASK_TYPES}, got '{mask_type}'")


def _keep_random_subset(mask: Tensor, k: Tensor, generator: Optional[torch.Generator]) -> Tensor:
    """Keep ``k`` (a tensor on ``mask``'s device: per row, or one value) uniformly chosen True entries of
    each row of ``mask``."""
    keys = torch.rand(mask.shape, device=mask.device, generator=generator).masked_fill(~mask, 2.0)
    rank = keys.argsort(dim=1).argsort(dim=1)
    return mask & (rank < k.reshape(-1, 1))


def check_covered(covered: Sequence[int], mask_length: int, min_masks: int) -> None:
    """Raise ValueError for the rows whose every valid frame the spans covered (host values of
    :func:`span_mask`'s ``covered``: a row's valid frames when covered, -1 otherwise): the utterances are
    too short for the masking settings."""
    bad = [b for b, v in enumerate(covered) if v >= 0]
    if bad:
        raise ValueError(
            f"masking would cover every frame of rows {bad} (valid frames {[covered[b] for b in bad]}, mask_length "
            f"{mask_length}, min_masks {min_masks}): the inputs are too short; drop them "
            "(task.min_sample_size) or lower model.mask_length"
        )


def compute_mask_indices(
    shape: tuple[int, int],
    padding_mask: Optional[Tensor],
    mask_prob: float,
    mask_length: int,
    mask_type: str = "static",
    mask_other: float = 0.0,
    min_masks: int = 0,
    require_same_masks: bool = True,
    mask_dropout: float = 0.0,
    device: Optional[torch.device | str] = None,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """Random span mask of ``shape = (B, L)``: bool ``(B, L)``, True = masked (see module docstring).

    Args:
        padding_mask: ``(B, L)`` bool, True at padded positions (never masked), or None.
        device: where to build the mask (default: ``padding_mask``'s device, else CPU).
        generator: a ``torch.Generator`` on that device for reproducible masks (default: global RNG).

    Raises ValueError when the spans cover every valid frame of a row (fairseq raises too): the utterance
    is too short for ``mask_length`` / ``min_masks``; drop such inputs (``task.min_sample_size``). That
    check reads a result on the host; :func:`span_mask` leaves it to the caller.
    """
    mask, covered = span_mask(shape, padding_mask, mask_prob, mask_length, mask_type, mask_other, min_masks,
                              require_same_masks, mask_dropout, device, generator)
    check_covered(HostCopy(covered).get(), mask_length, min_masks)
    return mask


def span_mask(
    shape: tuple[int, int],
    padding_mask: Optional[Tensor],
    mask_prob: float,
    mask_length: int,
    mask_type: str = "static",
    mask_other: float = 0.0,
    min_masks: int = 0,
    require_same_masks: bool = True,
    mask_dropout: float = 0.0,
    device: Optional[torch.device | str] = None,
    generator: Optional[torch.Generator] = None,
) -> tuple[Tensor, Tensor]:
    """:func:`compute_mask_indices` without a host read: ``(mask, covered)``, ``covered`` ``(B,)`` int64 the
    number of valid frames of each row whose valid frames the spans covered entirely (before
    ``require_same_masks`` / ``mask_dropout``), -1 for the other rows; :func:`check_covered` raises for them.

    ``require_same_masks`` draws its subset with the generator whenever ``B > 1``, also when the rows
    already have equal counts (it then leaves them unchanged): whether they do is not known on the host.
    """
    if mask_type not in MASK_TYPES:
        raise ValueError(f"mask selection must be one of {MASK_TYPES}, got '{mask_type}'")
    if mask_length < 1:
        raise ValueError(f"mask length must be >= 1, got {mask_length}")
    B, L = shape
    if padding_mask is not None:
        device = padding_mask.device
    device = torch.device(device) if device is not None else torch.device("cpu")
    if mask_prob <= 0 or B == 0 or L == 0:
        return torch.zeros(B, L, dtype=torch.bool, device=device), torch.full((B,), -1, device=device)

    def rand(*size: int) -> Tensor:
        return torch.rand(size, device=device, generator=generator, dtype=torch.float64)

    if padding_mask is not None:
        sz = L - padding_mask.sum(dim=1)
    else:
        sz = torch.full((B,), L, dtype=torch.long, device=device)
    N = max(min_masks, int(mask_prob * L / mask_length + 1))  # host-side bound on num: no sync
    num = (mask_prob * sz / mask_length + rand(B)).floor().long().clamp(min=min_masks, max=N)  # (B,)

    span_ids = torch.arange(N, device=device)
    in_use = span_ids < num[:, None]  # (B, N)
    lengths = _span_lengths(mask_type, (B, N), mask_length, mask_other, device, generator) * in_use
    if mask_type != "static":  # all-zero lengths: one span of min(mask_length, sz - 1), as fairseq
        empty = (lengths.sum(dim=1) == 0) & (num > 0)
        first = torch.minimum(torch.full_like(sz, mask_length), sz - 1).clamp(min=0)
        lengths[:, 0] = torch.where(empty, first, lengths[:, 0])
    min_len = lengths.masked_fill(~in_use, torch.iinfo(torch.long).max).min(dim=1).values
    starts_range = sz - min_len
    starts_range = torch.where(starts_range <= num, num + 1, starts_range)  # fairseq's min_len fallback

    # num distinct starts, uniformly from [0, starts_range): the num smallest of random keys
    W = max(L, N + 1)
    keys = rand(B, W).masked_fill(torch.arange(W, device=device) >= starts_range[:, None], 2.0)
    starts = keys.topk(N, dim=1, largest=False).indices  # (B, N), random order

    # host-side bound on the span length: positions past the row's valid frames are dropped anyway
    max_len = mask_length if mask_type == "static" else 2 * mask_length if mask_type == "uniform" else L
    offsets = torch.arange(max_len, device=device)
    pos = starts[:, :, None] + offsets  # (B, N, max_len)
    valid = (offsets < lengths[:, :, None]) & (pos < sz[:, None, None])
    pos = torch.where(valid, pos, L).reshape(B, -1)  # column L is a discarded dump slot
    mask = torch.zeros(B, L + 1, dtype=torch.bool, device=device).scatter_(1, pos, True)[:, :L]

    counts = mask.sum(dim=1)
    covered = torch.where(counts >= sz, sz, -1)
    if require_same_masks and B > 1:
        counts = counts.min().expand(B)
        mask = _keep_random_subset(mask, counts, generator)
    if mask_dropout > 0:
        holes = (counts.double() * mask_dropout).round().long()
        mask = mask & ~_keep_random_subset(mask, holes, generator)
    return mask, covered


def mask_positions(mask: Tensor, count: int) -> Tensor:
    """Indices ``(..., count)`` of the first ``count`` True entries along the last dim of ``mask``, ascending.

    With ``count`` the (host-known) number of True entries per row, ``x.gather`` / ``index_select`` at these
    indices equals boolean-mask indexing ``x[mask]`` (row-major order) without its host-device sync: a
    stable descending sort puts the True entries first, in order.
    """
    return mask.to(torch.uint8).sort(dim=-1, descending=True, stable=True).indices[..., :count]


def block_mask(shape: tuple[int, int], mask_prob: float, mask_length: int, mask_prob_adjust: float = 0.0,
               device: Optional[torch.device | str] = None, generator: Optional[torch.Generator] = None) -> Tensor:
    """data2vec 2.0's block mask (fairseq's ``compute_block_mask_1d``, ``require_same_masks``): bool ``(B, L)``,
    True = masked, exactly ``int(L * mask_prob)`` masked frames in every row.

    1. ``int(L * (mask_prob + mask_prob_adjust) / mask_length)`` span centres per row, uniform over the ``L``
       frames, with replacement; each masks frames ``c - mask_length // 2 .. c - mask_length // 2 +
       mask_length - 1``, clipped to ``[0, L - 1]`` (overlaps merge);
    2. then exactly ``int(L * mask_prob)`` per row: a uniformly random subset of the painted frames when there
       are more, all of them plus uniformly random other frames when there are fewer (fairseq unmasks / masks
       such frames with ``multinomial``; here the ``int(L * mask_prob)`` largest of ``painted + U[0, 1)``, the
       same distribution, in one ``topk`` on the device, no host read).

    The count is the same in every row, so the unmasked frames of a batch form a ``(B, L - M)`` block.
    fairseq draws these masks per utterance at its full length in the data loader and crops them with the
    batch; here they are drawn at the batch's length, so every row has exactly ``int(L * mask_prob)``.
    """
    B, L = shape
    device = torch.device(device) if device is not None else torch.device("cpu")
    if mask_length < 1:
        raise ValueError(f"mask length must be >= 1, got {mask_length}")
    target = int(L * mask_prob)
    painted = torch.zeros(B, L, dtype=torch.bool, device=device)
    spans = int(L * (mask_prob + mask_prob_adjust) / mask_length)
    if spans > 0 and L > 0:
        centres = torch.randint(0, L, (B, spans), device=device, generator=generator)
        offsets = torch.arange(mask_length, device=device) - mask_length // 2
        painted.scatter_(1, (centres[:, :, None] + offsets).clamp_(0, L - 1).reshape(B, -1), True)
    keys = torch.rand(B, L, device=device, generator=generator) + painted
    chosen = keys.topk(target, dim=1).indices
    return torch.zeros(B, L, dtype=torch.bool, device=device).scatter_(1, chosen, True)
