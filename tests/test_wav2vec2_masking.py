"""Span masking: fairseq's compute_mask_indices distribution, vectorized (speechssl.models.masking)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from speechssl.models.masking import compute_mask_indices

from wav2vec2_fixtures import single_thread  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("single_thread")


def fairseq_static_mask(rng: np.random.Generator, sizes: list[int], total: int, mask_prob: float, mask_length: int,
                        min_masks: int, require_same_masks: bool = True) -> np.ndarray:
    """Test oracle: fairseq's per-utterance numpy algorithm (static spans, no_overlap=False)."""
    rows = []
    for sz in sizes:
        num = max(min_masks, int(mask_prob * sz / mask_length + rng.random()))
        min_len = mask_length
        if sz - min_len <= num:
            min_len = sz - num - 1
        starts = rng.choice(sz - min_len, num, replace=False)
        idc = np.asarray([s + o for s in starts for o in range(mask_length)])
        rows.append(np.unique(idc[idc < sz]))
    target = min(len(r) for r in rows) if require_same_masks else None
    mask = np.zeros((len(sizes), total), dtype=bool)
    for i, idc in enumerate(rows):
        if target is not None and len(idc) > target:
            idc = rng.choice(idc, target, replace=False)
        mask[i, idc] = True
    return mask


def test_per_position_frequencies_match_fairseq():
    """Same span distribution: masking frequency of every frame position (edge effects included) for
    utterances of three lengths, over 3000 draws each (one vectorized call)."""
    sizes, total, draws = [60, 45, 30], 60, 3000
    lengths = torch.tensor(sizes).repeat(draws)
    padding = torch.arange(total)[None, :] >= lengths[:, None]
    ours = compute_mask_indices((len(lengths), total), padding, 0.65, 10, min_masks=2, require_same_masks=False,
                                generator=torch.Generator().manual_seed(0)).float().view(draws, 3, total)
    rng = np.random.default_rng(0)
    ref = np.stack([fairseq_static_mask(rng, sizes, total, 0.65, 10, 2, require_same_masks=False)
                    for _ in range(draws)])
    ref = torch.from_numpy(ref).float()
    assert (ours.mean(0) - ref.mean(0)).abs().max() < 0.05  # binomial std at 3000 draws < 0.01
    assert (ours.sum(-1).mean(0) - ref.sum(-1).mean(0)).abs().max() < 0.5


def test_same_masks_subsampling_matches_fairseq():
    """require_same_masks: every row keeps as many frames as the least-masked row (same mean count)."""
    sizes, total, draws = [60, 45, 30], 60, 400
    padding = torch.arange(total)[None, :] >= torch.tensor(sizes)[:, None]
    g = torch.Generator().manual_seed(1)
    ours = torch.stack([compute_mask_indices((3, total), padding, 0.65, 10, min_masks=2, generator=g)
                        for _ in range(draws)]).sum(-1).float()
    rng = np.random.default_rng(1)
    ref = torch.tensor(np.stack([fairseq_static_mask(rng, sizes, total, 0.65, 10, 2).sum(-1)
                                 for _ in range(draws)])).float()
    assert (ours == ours[:, :1]).all()
    assert abs(ours.mean() - ref.mean()) < 0.6  # std of the mean ~0.2


def test_masked_fraction_on_long_inputs():
    mask = compute_mask_indices((64, 2000), None, 0.65, 10, min_masks=2, require_same_masks=False,
                                generator=torch.Generator().manual_seed(1))
    frac = mask.float().mean().item()
    assert 0.47 < frac < 0.51  # ~49% (paper), spans overlap
    same = compute_mask_indices((64, 2000), None, 0.65, 10, min_masks=2, generator=torch.Generator().manual_seed(1))
    assert same.sum(1).unique().numel() == 1 and 0.44 < same.float().mean().item() <= frac


def test_padding_never_masked_and_rows_equal():
    sizes = torch.tensor([200, 150, 90, 37])
    padding = torch.arange(200)[None, :] >= sizes[:, None]
    for seed in range(20):
        mask = compute_mask_indices((4, 200), padding, 0.65, 10, min_masks=2,
                                    generator=torch.Generator().manual_seed(seed))
        assert not (mask & padding).any()
        counts = mask.sum(1)
        assert (counts == counts[0]).all() and counts[0] > 0


def test_min_masks_respected():
    # mask_prob so small that int(p * sz / len + U) is 0: min_masks distinct starts of length 1 remain
    for seed in range(10):
        mask = compute_mask_indices((8, 50), None, 0.001, 1, min_masks=2, require_same_masks=False,
                                    generator=torch.Generator().manual_seed(seed))
        assert (mask.sum(1) == 2).all()
    mask = compute_mask_indices((8, 50), None, 0.001, 5, min_masks=3, require_same_masks=False,
                                generator=torch.Generator().manual_seed(0))
    assert (mask.sum(1) >= 5).all()


def test_deterministic_under_generator():
    padding = torch.arange(100)[None, :] >= torch.tensor([100, 70])[:, None]
    a = compute_mask_indices((2, 100), padding, 0.65, 10, min_masks=2, generator=torch.Generator().manual_seed(7))
    b = compute_mask_indices((2, 100), padding, 0.65, 10, min_masks=2, generator=torch.Generator().manual_seed(7))
    c = compute_mask_indices((2, 100), padding, 0.65, 10, min_masks=2, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.manual_seed(3)
    d = compute_mask_indices((2, 100), padding, 0.65, 10, min_masks=2)
    torch.manual_seed(3)
    assert torch.equal(d, compute_mask_indices((2, 100), padding, 0.65, 10, min_masks=2))


def test_spans_are_contiguous_runs():
    mask = compute_mask_indices((1, 1000), None, 0.05, 10, require_same_masks=False,
                                generator=torch.Generator().manual_seed(0))[0]
    edges = torch.diff(mask.int(), prepend=torch.zeros(1, dtype=torch.int), append=torch.zeros(1, dtype=torch.int))
    runs = (edges == -1).nonzero().flatten() - (edges == 1).nonzero().flatten()
    assert (runs % 10 == 0).all() or (runs >= 10).all()  # merged overlapping spans are longer, never shorter


def test_mask_dropout_unmasks_a_fraction():
    g = torch.Generator().manual_seed(0)
    full = compute_mask_indices((4, 300), None, 0.65, 10, min_masks=2, generator=g)
    g = torch.Generator().manual_seed(0)
    dropped = compute_mask_indices((4, 300), None, 0.65, 10, min_masks=2, mask_dropout=0.2, generator=g)
    count = int(full.sum(1)[0])
    assert not (dropped & ~full).any()
    assert (dropped.sum(1) == count - round(count * 0.2)).all()


@pytest.mark.parametrize("mask_type,other", [("uniform", 2.0), ("normal", 3.0), ("poisson", 0.0)])
def test_other_span_length_distributions(mask_type, other):
    padding = torch.arange(400)[None, :] >= torch.tensor([400, 300, 250])[:, None]
    mask = compute_mask_indices((3, 400), padding, 0.5, 10, mask_type=mask_type, mask_other=other, min_masks=2,
                                generator=torch.Generator().manual_seed(0))
    assert not (mask & padding).any()
    assert (mask.sum(1) == mask.sum(1)[0]).all() and 0.2 < mask[0].float().mean() < 0.7


def test_too_short_input_is_a_clear_error():
    with pytest.raises(ValueError, match="too short"):
        compute_mask_indices((64, 8), None, 0.65, 10, min_masks=2)
    with pytest.raises(ValueError, match="mask selection"):
        compute_mask_indices((2, 8), None, 0.65, 10, mask_type="zipf")
