"""Seeded splits for ``speechssl manifest``: carving a validation set (or, for closed-set speaker
identification, a validation and a test set), and a speaker-balanced subset.

The functions take items with ``.speaker`` (str or None) and ``.seconds`` and a ``sort_key``, and are
deterministic for a seed: inputs are sorted first, and randomness comes from ``random.Random(seed)``.
"""

from __future__ import annotations

import heapq
import random
from collections import defaultdict
from typing import Protocol, Sequence, TypeVar


class _Item(Protocol):
    speaker: str | None
    sort_key: str

    @property
    def seconds(self) -> float: ...


T = TypeVar("T", bound=_Item)


class SplitError(ValueError):
    """The split cannot be made as asked (e.g. a speaker split with one speaker)."""


def _by_speaker(items: Sequence[T]) -> dict[str | None, list[T]]:
    groups: dict[str | None, list[T]] = defaultdict(list)
    for item in sorted(items, key=lambda it: it.sort_key):
        groups[item.speaker].append(item)
    return groups


def carve_valid(items: Sequence[T], fraction: float, seed: int, by: str = "utterance") -> tuple[list[T], list[T]]:
    """Split ``items`` into (train, valid), both sorted by ``sort_key``.

    by="speaker": valid holds every utterance of ``round(fraction * speakers)`` (at least 1) randomly
    chosen speakers, never all of them: unseen-speaker validation. Needs a speaker on every item.

    by="utterance": valid holds ``round(fraction * len(items))`` (at least 1 when ``fraction`` > 0)
    utterances, spread over speakers in proportion to their utterance counts, and every speaker keeps
    at least one utterance in train (closed set: valid speakers are train speakers). Items without a
    speaker form one group, so with no speakers at all this is a plain random split.
    """
    if not 0.0 <= fraction < 1.0:
        raise SplitError(f"valid fraction must be in [0, 1), got {fraction}")
    rng = random.Random(seed)
    groups = _by_speaker(items)
    if fraction == 0 or not items:
        return sorted(items, key=lambda it: it.sort_key), []
    if by == "speaker":
        unknown = groups.get(None, [])
        if unknown:
            raise SplitError(
                f"--split-by speaker needs a speaker for every file; {len(unknown)} have none "
                f"(e.g. {unknown[0].sort_key}): use the LibriSpeech layout speaker/chapter/file or --speaker-regex"
            )
        speakers = sorted(groups)
        if len(speakers) < 2:
            raise SplitError(f"--split-by speaker needs at least 2 speakers, found {len(speakers)}")
        n_valid = min(max(1, round(fraction * len(speakers))), len(speakers) - 1)
        held_out = set(rng.sample(speakers, n_valid))
        valid = [it for spk in speakers if spk in held_out for it in groups[spk]]
        train = [it for spk in speakers if spk not in held_out for it in groups[spk]]
    elif by == "utterance":
        keys = sorted(groups, key=lambda s: (s is None, s or ""))
        capacity = {s: len(groups[s]) - 1 for s in keys}  # each speaker keeps one utterance in train
        total = min(max(1, round(fraction * len(items))), sum(capacity.values()))
        quota = _allocate(total, {s: len(groups[s]) for s in keys}, capacity, rng)
        train, valid = [], []
        for s in keys:
            chosen = set(rng.sample(range(len(groups[s])), quota[s]))
            for i, it in enumerate(groups[s]):
                (valid if i in chosen else train).append(it)
    else:
        raise SplitError(f"split_by must be 'utterance' or 'speaker', got {by!r}")
    return sorted(train, key=lambda it: it.sort_key), sorted(valid, key=lambda it: it.sort_key)


def carve_closed_set(items: Sequence[T], valid_fraction: float, test_fraction: float,
                     seed: int) -> tuple[list[T], list[T], list[T]]:
    """Closed-set speaker-identification split ``(train, valid, test)``, each sorted by ``sort_key``.

    Holds out about ``valid_fraction`` and ``test_fraction`` of every speaker's utterances (test first,
    then valid from the rest, each as :func:`carve_valid` with ``by="utterance"``: proportional to the
    speakers' utterance counts), so all three splits have the same speakers; every speaker keeps at
    least one training utterance.
    """
    if valid_fraction < 0 or test_fraction < 0 or valid_fraction + test_fraction >= 1.0:
        raise SplitError(f"valid ({valid_fraction}) and test ({test_fraction}) fractions must be >= 0 and sum "
                         "to less than 1")
    rest, test = carve_valid(items, test_fraction, seed, "utterance")
    train, valid = carve_valid(rest, valid_fraction / (1.0 - test_fraction), seed + 1, "utterance")
    return train, valid, test


def _allocate(total: int, sizes: dict, capacity: dict, rng: random.Random) -> dict:
    """Largest-remainder apportionment of ``total`` over groups in proportion to ``sizes``, with
    per-group caps; ties are broken in a seeded random order."""
    n = sum(sizes.values())
    exact = {k: total * sizes[k] / n for k in sizes}
    quota = {k: min(int(exact[k]), capacity[k]) for k in sizes}
    order = list(sizes)
    rng.shuffle(order)
    order.sort(key=lambda k: exact[k] - int(exact[k]), reverse=True)  # stable: shuffled among ties
    while sum(quota.values()) < total:
        for k in order:
            if sum(quota.values()) == total:
                break
            if quota[k] < capacity[k]:
                quota[k] += 1
    return quota


def balanced_subset(items: Sequence[T], max_seconds: float, seed: int) -> list[T]:
    """A seeded random subset of at most ``max_seconds`` in total, balanced over speakers (as the
    Libri-light 10 min / 1 h sets): the speaker with the least audio so far always picks next, taking
    its next utterance (in a seeded random order) that still fits the budget. Per-speaker totals thus
    differ by at most about one utterance. Items without a speaker form one group. Sorted output."""
    if max_seconds <= 0:
        raise SplitError(f"--train-seconds must be > 0, got {max_seconds}")
    rng = random.Random(seed)
    groups = _by_speaker(items)
    speakers = sorted(groups, key=lambda s: (s is None, s or ""))
    rng.shuffle(speakers)
    queues = {}
    for s in speakers:
        queue = list(groups[s])
        rng.shuffle(queue)
        queues[s] = queue[::-1]  # pop() from the end = the shuffled order
    heap = [(0.0, rank, s) for rank, s in enumerate(speakers)]
    heapq.heapify(heap)
    chosen, total = [], 0.0
    while heap:
        taken, rank, s = heapq.heappop(heap)
        queue = queues[s]
        while queue:
            it = queue.pop()
            if total + it.seconds <= max_seconds:
                chosen.append(it)
                total += it.seconds
                heapq.heappush(heap, (taken + it.seconds, rank, s))
                break
    return sorted(chosen, key=lambda it: it.sort_key)
