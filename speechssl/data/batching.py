"""Dynamic, length-bucketed batching (fairseq's ``batch_by_size``), reshuffled per epoch, sharded per rank.

Each epoch (all from ``(seed, epoch)``, identical on every rank):

1. order the items by batch size, longest first, ties broken at random (fairseq's
   ``ordered_indices``: lexsort on (random permutation, size), reversed);
2. cut that order into batches holding at most ``max_tokens`` samples *including padding*
   (``len(batch) * longest``), at most ``max_sentences`` items, and a multiple of
   ``required_batch_size_multiple`` items where possible (fairseq's rule);
3. shuffle the order of the batches;
4. deal them to ranks round-robin (rank r gets batches r, r+W, ...). Training drops the last
   ``len % W`` batches so every rank takes the same number of steps (a different few each epoch);
   validation keeps them all.

Step 2 loops over batches, not items: the longest item of a batch is its first, so a batch starting at
position i holds ``max_tokens // size[i]`` items.
"""

from __future__ import annotations

from typing import Iterator, Optional

import numpy as np


def ordered_indices(sizes: np.ndarray, rng: Optional[np.random.Generator]) -> np.ndarray:
    """Indices sorted by size, longest first; ties in random order (``rng``) or by index (None)."""
    if rng is None:
        return np.argsort(-sizes, kind="stable")
    return np.lexsort((rng.permutation(len(sizes)), sizes))[::-1].copy()


def batch_by_size(
    order: np.ndarray,
    sizes: np.ndarray,
    max_tokens: Optional[int],
    max_sentences: Optional[int] = None,
    required_batch_size_multiple: int = 1,
) -> list[np.ndarray]:
    """Cut ``order`` (indices sorted longest first) into batches; see the module docstring.

    Returns a list of int64 index arrays. Raises ValueError if one item alone exceeds ``max_tokens``.
    """
    if max_tokens is None and max_sentences is None:
        raise ValueError("set dataset.max_tokens (audio samples per batch) or dataset.batch_size")
    for name, value in (("max_tokens", max_tokens), ("max_sentences", max_sentences)):
        if value is not None and value < 1:  # a batch of 0 items would never advance
            raise ValueError(f"{name} must be >= 1, got {value}")
    n = len(order)
    batch_sizes = sizes[order]
    if max_tokens is not None and n and batch_sizes.max() > max_tokens:
        raise ValueError(
            f"an utterance of {int(batch_sizes.max())} samples exceeds dataset.max_tokens={max_tokens}: lower "
            "task.max_sample_size (crop) below dataset.max_tokens, or raise dataset.max_tokens"
        )
    mult = max(1, required_batch_size_multiple)
    batches = []
    start = 0
    while start < n:
        bsz = n - start
        if max_tokens is not None:
            bsz = min(bsz, max_tokens // max(1, int(batch_sizes[start])))
        if max_sentences is not None:
            bsz = min(bsz, max_sentences)
        if start + bsz < n and bsz > mult:  # a cut batch: round down to the multiple (fairseq's mod_len)
            bsz = max(mult * (bsz // mult), bsz % mult)
        bsz = max(bsz, 1)  # an item longer than max_tokens was refused above; never an empty batch
        batches.append(order[start : start + bsz])
        start += bsz
    return batches


class EpochBatchSampler:
    """Batch sampler for ``torch.utils.data.DataLoader(batch_sampler=...)``.

    Yields lists of dataset keys ``(index, target_len, epoch)`` (see :class:`AudioDataset`) for this rank.
    Call :meth:`set_epoch` before iterating; ``offset`` skips the batches this rank already consumed
    in that epoch (exact resume), without reading them.

    Args:
        sizes: per-item batch sizes (``AudioDataset.batch_sizes``).
        target_len: function(indices) -> crop/pad length of a batch (``AudioDataset.target_len``).
        shuffle: per-epoch random tie-breaks and batch order (training); else fixed order (validation).
        drop_uneven: drop the ``len % world_size`` last batches so all ranks get as many (training).
    """

    def __init__(
        self,
        sizes: np.ndarray,
        target_len,
        max_tokens: Optional[int],
        max_sentences: Optional[int] = None,
        required_batch_size_multiple: int = 1,
        seed: int = 1,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        drop_uneven: bool = True,
    ):
        self.sizes = np.asarray(sizes, dtype=np.int64)
        self.target_len = target_len
        self.max_tokens = max_tokens
        self.max_sentences = max_sentences
        self.mult = required_batch_size_multiple
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.drop_uneven = drop_uneven
        self.epoch = 1
        self.offset = 0
        self._cache: tuple[int, list[np.ndarray]] | None = None

    def all_batches(self, epoch: int) -> list[np.ndarray]:
        """Every rank's batches of ``epoch``, in the order they are dealt."""
        rng = np.random.default_rng((self.seed, epoch)) if self.shuffle else None
        order = ordered_indices(self.sizes, rng)
        batches = batch_by_size(order, self.sizes, self.max_tokens, self.max_sentences, self.mult)
        if rng is not None:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches

    def batches(self, epoch: int) -> list[np.ndarray]:
        """This rank's batches of ``epoch``."""
        if self._cache is None or self._cache[0] != epoch:
            batches = self.all_batches(epoch)
            if self.drop_uneven:
                batches = batches[: len(batches) - len(batches) % self.world_size]
            self._cache = (epoch, batches[self.rank :: self.world_size])
        return self._cache[1]

    def num_dropped(self, epoch: int) -> int:
        """Batches dropped in ``epoch`` to give every rank the same number."""
        return len(self.all_batches(epoch)) % self.world_size if self.drop_uneven else 0

    def set_epoch(self, epoch: int, offset: int = 0) -> None:
        self.epoch, self.offset = epoch, offset

    def __len__(self) -> int:
        return max(0, len(self.batches(self.epoch)) - self.offset)

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        epoch = self.epoch
        for batch in self.batches(epoch)[self.offset :]:
            target = self.target_len(batch)
            yield [(int(i), target, epoch) for i in batch]
