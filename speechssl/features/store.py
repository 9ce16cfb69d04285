"""Frame features on disk: fairseq's sharded layout, memory-mappable, written atomically.

A split's features are cut into ``nshard`` shards by manifest line (fairseq's ``get_shard_range``:
shard ``i`` holds lines ``round(N * i / n) .. round(N * (i + 1) / n)``). Shard ``i`` of ``n`` is three
files in the features folder::

    <split>_<i>_<n>.npy    float32 (frames, dim): every utterance's frames, concatenated in manifest order
    <split>_<i>_<n>.len    frames of each utterance, one count per line
    <split>_<i>_<n>.json   what the shard is: kind, dim, rate (frames/s), sample_rate, the manifest (path,
                           sha1, line range), extraction settings, frame total

The ``.npy``/``.len`` pair is exactly what fairseq's ``dump_*_feature.py`` write, so its
``learn_kmeans.py`` / ``dump_km_label.py`` read these shards and :meth:`FeatureSet.from_npy` reads theirs.
The ``.npy`` is a standard NumPy file (``np.load(path, mmap_mode="r")``).

A shard is written to a temporary file, renamed, and its ``.json`` is written last: a shard is finished
if and only if its ``.json`` exists and agrees with the ``.npy`` and ``.len`` beside it, so an
interrupted run never leaves anything that looks finished (:func:`shard_state`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from speechssl.utils.io import atomic_write_text, chmod_as_created

FORMAT = "speechssl-features"
VERSION = 1
# meta keys that must agree for an existing shard to count as the one being asked for
IDENTITY_KEYS = ("kind", "settings", "dim", "rate", "sample_rate", "manifest_sha1", "line_start", "line_end")


class FeatureStoreError(ValueError):
    """Missing, incomplete or inconsistent feature files; the message names the file and what to do."""


# --------------------------------------------------------------------------------------------------
# Shards
# --------------------------------------------------------------------------------------------------


def shard_range(total: int, nshard: int, shard: int) -> tuple[int, int]:
    """Lines ``[start, end)`` of shard ``shard`` of ``nshard`` over ``total`` lines (fairseq's split)."""
    if not 0 <= shard < nshard:
        raise FeatureStoreError(f"shard {shard} is not in [0, {nshard}): --shard must be below --nshard")
    if nshard > total:
        raise FeatureStoreError(f"{nshard} shards for {total} utterances: use at most {total} shards")
    return round(total / nshard * shard), round(total / nshard * (shard + 1))


def resolve_shards(shard: Optional[int], nshard: Optional[int]) -> tuple[list[int], int]:
    """Which shards this process does: ``--shard i`` -> [i]; else under torchrun (``RANK``/``WORLD_SIZE``
    with ``WORLD_SIZE > 1``) its rank; else all of ``range(nshard)`` one after the other."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if shard is None and world > 1:
        if nshard is not None and nshard != world:
            raise FeatureStoreError(f"--nshard {nshard} differs from torchrun's WORLD_SIZE={world}; drop --nshard")
        return [int(os.environ["RANK"])], world
    n = nshard or 1
    if n < 1:
        raise FeatureStoreError(f"--nshard must be >= 1, got {n}")
    if shard is not None:
        shard_range(n, n, shard)  # validates 0 <= shard < n
        return [shard], n
    return list(range(n)), n


@dataclass(frozen=True)
class ShardFiles:
    npy: Path
    len: Path
    meta: Path

    @classmethod
    def of(cls, folder: str | Path, split: str, shard: int, nshard: int) -> "ShardFiles":
        stem = Path(folder) / f"{split}_{shard}_{nshard}"
        return cls(stem.with_suffix(".npy"), stem.with_suffix(".len"), stem.with_suffix(".json"))


def file_sha1(path: str | Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_lengths(path: Path) -> np.ndarray:
    """A ``.len`` file -> int64 ``(utterances,)``."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise FeatureStoreError(f"{path} is missing (every .npy feature shard needs its .len beside it)") from None
    try:
        return np.array([int(v) for v in text.split()], dtype=np.int64)
    except ValueError:
        raise FeatureStoreError(f"{path}: expected one integer frame count per line") from None


def read_meta(files: ShardFiles) -> Optional[dict[str, Any]]:
    try:
        meta = json.loads(files.meta.read_text())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as exc:
        raise FeatureStoreError(f"{files.meta}: not valid JSON ({exc}); delete it or rerun with --force") from None
    if meta.get("format") != FORMAT:
        raise FeatureStoreError(f"{files.meta} is not a speechssl feature index (format={meta.get('format')!r})")
    return meta


def shard_state(files: ShardFiles, expected: dict[str, Any]) -> str:
    """``"missing"`` (not finished: extract it), ``"done"`` (finished with the same identity) or, for a
    finished shard made differently (other settings, other manifest), the differences."""
    meta = read_meta(files)
    if meta is None or not files.npy.is_file() or not files.len.is_file():
        return "missing"
    try:
        rows = np.load(files.npy, mmap_mode="r").shape[0]
    except (ValueError, OSError):
        return "missing"
    if rows != meta.get("num_frames") or len(read_lengths(files.len)) != meta.get("num_utterances"):
        return "missing"
    diffs = [f"{k}: {meta.get(k)!r} on disk, {expected.get(k)!r} now" for k in IDENTITY_KEYS
             if meta.get(k) != expected.get(k)]
    return "; ".join(diffs) if diffs else "done"


class ShardWriter:
    """Writes one shard whose frame counts are known in advance (the extractors predict them from the
    manifest's sample counts and check every utterance against its prediction).

    ``with ShardWriter(files, lengths, dim) as w: w.write(i, feats); ...; w.commit(meta)``: frames go to
    a temporary memory-mapped ``.npy`` beside the target; :meth:`commit` flushes it and renames it, then
    writes ``.len`` and the ``.json`` index. Leaving the block without commit (an error, Ctrl-C) removes
    the temporary file and leaves no ``.json``.
    """

    def __init__(self, files: ShardFiles, lengths: np.ndarray, dim: int, dtype: str = "float32"):
        self.files = files
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)])
        self.dim = dim
        files.npy.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            files.meta.unlink()  # from now on the shard is unfinished, whatever is on disk
        fd, tmp = tempfile.mkstemp(prefix=f".{files.npy.name}.", suffix=".tmp", dir=files.npy.parent)
        os.close(fd)
        self.tmp = Path(tmp)
        self.data = np.lib.format.open_memmap(self.tmp, mode="w+", dtype=dtype,
                                              shape=(int(self.offsets[-1]), dim))

    def write(self, index: int, feats: np.ndarray, name: str = "") -> None:
        """Frames ``(n, dim)`` of the shard's ``index``-th utterance; ``n`` must be as predicted."""
        n = int(self.lengths[index])
        if feats.shape != (n, self.dim):
            raise FeatureStoreError(f"{name or f'utterance {index}'}: features of shape {tuple(feats.shape)}, "
                                    f"expected ({n}, {self.dim}) from its manifest sample count")
        self.data[self.offsets[index] : self.offsets[index + 1]] = feats

    def commit(self, meta: dict[str, Any]) -> None:
        self.data.flush()
        del self.data
        with open(self.tmp, "rb") as fh:
            os.fsync(fh.fileno())
        chmod_as_created(self.tmp)  # mkstemp made it 0600
        os.replace(self.tmp, self.files.npy)
        atomic_write_text(self.files.len, "".join(f"{n}\n" for n in self.lengths.tolist()))
        meta = {"format": FORMAT, "version": VERSION, **meta, "dim": self.dim,
                "num_utterances": len(self.lengths), "num_frames": int(self.offsets[-1])}
        atomic_write_text(self.files.meta, json.dumps(meta, indent=1, sort_keys=True) + "\n")

    def abort(self) -> None:
        if hasattr(self, "data"):
            del self.data
        with contextlib.suppress(FileNotFoundError):
            self.tmp.unlink()

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------


@dataclass
class FeatureShard:
    data: np.ndarray  # (frames, dim) read-only memmap
    lengths: np.ndarray  # (utterances,) int64
    meta: dict[str, Any]  # the .json index ({} for fairseq shards)
    path: Path

    def __post_init__(self) -> None:
        if int(self.lengths.sum()) != self.data.shape[0]:
            raise FeatureStoreError(f"{self.path}: {self.data.shape[0]} frames but its .len file sums to "
                                    f"{int(self.lengths.sum())}; re-extract this shard")


class FeatureSet:
    """All shards of a split, in manifest order: ``lengths`` ``(utterances,)``, ``dim``, ``rate``,
    :meth:`utterance`, :meth:`chunks` (frames in blocks for labeling), :meth:`sample` (for k-means)."""

    def __init__(self, shards: Sequence[FeatureShard]):
        if not shards:
            raise FeatureStoreError("no feature shards given")
        self.shards = list(shards)
        dims = {s.data.shape[1] for s in self.shards}
        if len(dims) != 1:
            raise FeatureStoreError(f"shards of different dimensions {sorted(dims)}: "
                                    + ", ".join(str(s.path) for s in self.shards))
        self.dim = dims.pop()
        self.lengths = np.concatenate([s.lengths for s in self.shards])
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)])  # global frame offset of each utterance
        self._first_utt = np.cumsum([0] + [len(s.lengths) for s in self.shards])  # first utterance of each shard
        self.meta = self.shards[0].meta

    @property
    def num_frames(self) -> int:
        return int(self.offsets[-1])

    @property
    def rate(self) -> Optional[float]:
        """Frames per second (None for shards without a speechssl .json index)."""
        return self.meta.get("rate")

    @classmethod
    def open(cls, folder: str | Path, split: str, nshard: Optional[int] = None) -> "FeatureSet":
        """The finished shards ``<split>_*_<n>`` of ``folder``; all ``n`` must be there, their manifest
        line ranges must tile the whole manifest and agree on kind, dim, rate and manifest."""
        folder = Path(folder)
        name = re.compile(rf"^{re.escape(split)}_(\d+)_(\d+)\.json$")
        counts = sorted({int(m.group(2)) for p in folder.glob(f"{split}_*_*.json") if (m := name.match(p.name))})
        if nshard is None:
            if not counts:
                raise FeatureStoreError(f"no finished '{split}' features in {folder} (no {split}_<i>_<n>.json); "
                                        "extract them with 'speechssl features'")
            if len(counts) > 1:
                raise FeatureStoreError(f"{folder} holds '{split}' features cut into {counts} shards; "
                                        "choose one with --nshard")
            nshard = counts[0]
        shards, metas = [], []
        for i in range(nshard):
            files = ShardFiles.of(folder, split, i, nshard)
            meta = read_meta(files)
            if meta is None or shard_state(files, meta) != "done":
                raise FeatureStoreError(f"{files.npy}: shard {i} of {nshard} is missing or unfinished; "
                                        f"run 'speechssl features ... --split {split} --nshard {nshard}' again")
            metas.append(meta)
            shards.append(FeatureShard(np.load(files.npy, mmap_mode="r"), read_lengths(files.len), meta, files.npy))
        first = metas[0]
        for i, m in enumerate(metas):
            same = all(m.get(k) == first.get(k) for k in ("kind", "settings", "dim", "rate", "manifest_sha1"))
            if not same or m["line_start"] != (metas[i - 1]["line_end"] if i else 0):
                raise FeatureStoreError(f"{folder}: shard {i} of {nshard} was made from another manifest or with "
                                        "other settings than shard 0; re-extract with --force")
        if metas[-1]["line_end"] != first["manifest_lines"]:
            raise FeatureStoreError(f"{folder}: the shards cover {metas[-1]['line_end']} of "
                                    f"{first['manifest_lines']} manifest lines; re-extract with --force")
        return cls(shards)

    @classmethod
    def from_npy(cls, paths: Sequence[str | Path]) -> "FeatureSet":
        """Shards given as ``.npy`` files (speechssl's or fairseq's), each with its ``.len`` beside it, in
        the order given; a ``.json`` index beside them is read when present."""
        shards = []
        for p in map(Path, paths):
            if p.suffix != ".npy" or not p.is_file():
                raise FeatureStoreError(f"{p}: expected an existing .npy feature shard")
            files = ShardFiles(p, p.with_suffix(".len"), p.with_suffix(".json"))
            meta = read_meta(files) or {}
            shards.append(FeatureShard(np.load(p, mmap_mode="r"), read_lengths(files.len), meta, p))
        return cls(shards)

    def utterance(self, index: int) -> np.ndarray:
        """Frames ``(n, dim)`` of the ``index``-th utterance (a view into the memmap)."""
        if not 0 <= index < len(self.lengths):
            raise IndexError(f"utterance {index} of {len(self.lengths)}")
        shard = int(np.searchsorted(self._first_utt, index, side="right")) - 1
        start = int(self.offsets[index] - self.offsets[self._first_utt[shard]])
        return self.shards[shard].data[start : start + int(self.lengths[index])]

    def chunks(self, rows: int = 1 << 16) -> Iterator[np.ndarray]:
        """All frames in order, in blocks of at most ``rows`` (read from the memmaps block by block)."""
        for s in self.shards:
            for start in range(0, s.data.shape[0], rows):
                yield np.asarray(s.data[start : start + rows])

    def sample(self, fraction: float, seed: int = 0) -> tuple[np.ndarray, int]:
        """Frames of a seeded random ``fraction`` of the utterances (at least one), as fairseq's
        ``learn_kmeans.py --percent``; read utterance by utterance in file order.
        Returns ``(frames (F, dim) float32, utterances sampled)``."""
        n_utt = len(self.lengths)
        if not 0 < fraction <= 1:
            raise FeatureStoreError(f"sample fraction must be in (0, 1], got {fraction}")
        if fraction >= 1:
            return np.concatenate([np.asarray(s.data, dtype=np.float32) for s in self.shards]), n_utt
        chosen = np.sort(np.random.default_rng(seed).choice(n_utt, max(1, int(np.ceil(n_utt * fraction))),
                                                            replace=False))
        out = np.empty((int(self.lengths[chosen].sum()), self.dim), dtype=np.float32)
        pos = 0
        for u in chosen.tolist():  # one slice per utterance, in file order: reads only what is sampled
            frames = self.utterance(u)
            out[pos : pos + len(frames)] = frames
            pos += len(frames)
        return out, len(chosen)
