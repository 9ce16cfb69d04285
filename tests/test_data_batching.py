"""Dynamic batching: max_tokens with padding, full coverage, per-epoch shuffling, rank shards, resume offset."""

import numpy as np
import pytest

from speechssl.data.batching import EpochBatchSampler, batch_by_size, ordered_indices


def sizes_(n=103, seed=0):
    return np.random.default_rng(seed).integers(1000, 16000, n)


def sampler(sizes, **kw):
    args = dict(max_tokens=40000, seed=1, rank=0, world_size=1, shuffle=True)
    args.update(kw)
    return EpochBatchSampler(sizes, lambda idx: int(sizes[idx].min()), **args)


def test_max_tokens_including_padding_and_coverage():
    sizes = sizes_()
    s = sampler(sizes)
    batches = s.batches(1)
    for b in batches:
        assert len(b) * sizes[b].max() <= 40000
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(len(sizes)))  # every item exactly once
    # length-bucketed: padding small compared with random batching
    padded = sum(len(b) * sizes[b].max() for b in batches)
    assert padded / sizes.sum() < 1.15


def test_epochs_reshuffle_deterministically():
    sizes = sizes_()
    a1, a2 = sampler(sizes).batches(1), sampler(sizes).batches(2)
    b1 = sampler(sizes).batches(1)
    assert [x.tolist() for x in a1] == [x.tolist() for x in b1]
    assert [x.tolist() for x in a1] != [x.tolist() for x in a2]
    assert [x.tolist() for x in sampler(sizes, seed=2).batches(1)] != [x.tolist() for x in a1]


def test_shards_disjoint_and_equal_length():
    sizes = sizes_(211)
    W = 3
    shards = [sampler(sizes, rank=r, world_size=W).batches(4) for r in range(W)]
    assert len({len(s) for s in shards}) == 1
    seen = [i for s in shards for b in s for i in b.tolist()]
    assert len(seen) == len(set(seen))  # disjoint
    everything = sampler(sizes, rank=0, world_size=W).all_batches(4)
    dropped = len(everything) % W
    assert sampler(sizes, world_size=W).num_dropped(4) == dropped
    assert len(seen) == len(sizes) - sum(len(b) for b in everything[len(everything) - dropped:])


def test_validation_keeps_uneven_shards():
    sizes = sizes_(50)
    shards = [sampler(sizes, rank=r, world_size=4, shuffle=False, drop_uneven=False).batches(0) for r in range(4)]
    assert sorted(i for s in shards for b in s for i in b.tolist()) == list(range(50))


def test_required_multiple_and_max_sentences():
    sizes = np.full(50, 1000)
    order = ordered_indices(sizes, None)
    bs = batch_by_size(order, sizes, max_tokens=13000, required_batch_size_multiple=4)
    assert [len(b) for b in bs] == [12, 12, 12, 12, 2]
    bs = batch_by_size(order, sizes, max_tokens=None, max_sentences=7)
    assert [len(b) for b in bs] == [7] * 7 + [1]
    with pytest.raises(ValueError, match="exceeds dataset.max_tokens"):
        batch_by_size(order, sizes, max_tokens=500)


def test_offset_skips_consumed_batches_and_yields_keys():
    sizes = sizes_()
    s = sampler(sizes)
    s.set_epoch(3)
    full = list(s)
    s.set_epoch(3, offset=5)
    assert len(s) == len(full) - 5
    assert list(s) == full[5:]
    first = full[0]
    idx = np.array([k[0] for k in first])
    assert all(k[1] == int(sizes[idx].min()) and k[2] == 3 for k in first)
