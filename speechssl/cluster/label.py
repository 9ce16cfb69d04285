"""HuBERT frame labels: k-means cluster ids of every frame, one line per manifest entry.

Files (fairseq's ``examples/hubert/simple_kmeans`` formats, read by its ``hubert_dataset.py``):

* ``<split>.km``: line ``i`` holds the space-separated cluster ids of the frames of TSV entry ``i``
  (TSV line ``i + 2``, after the root line), e.g. ``17 17 17 83 83 5 ...``;
* ``dict.km.txt``: one line ``<id> 1`` for every cluster id ``0 .. K-1`` (fairseq's dummy counts), so
  that no label maps to ``<unk>``; the same file serves every split.

:func:`verify_label_lengths` is the check fairseq's HuBERT dataset does at load time (audio duration vs.
label count at the label rate, tolerance 0.1 s), returning the problems instead of logging them; the
HuBERT dataset calls it, and :func:`write_labels` refuses to write labels that fail it.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

import numpy as np

from speechssl.features.store import FeatureSet, file_sha1, resolve_shards
from speechssl.utils.io import atomic_write_text

if TYPE_CHECKING:
    from speechssl.cluster.kmeans import KMeansModel

DEFAULT_TOLERANCE = 0.1  # seconds, as fairseq's hubert_dataset.verify_label_lengths


class LabelError(ValueError):
    """Labels that cannot be written as asked; the message says why and what to do."""


# --------------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LabelLengthProblem:
    index: int  # manifest entry (0-based; TSV line index + 2)
    num_samples: int
    num_labels: int
    sample_rate: float
    label_rate: float
    tol: float

    @property
    def audio_seconds(self) -> float:
        return self.num_samples / self.sample_rate

    @property
    def label_seconds(self) -> float:
        return self.num_labels / self.label_rate

    def __str__(self) -> str:
        return (f"entry {self.index} (TSV line {self.index + 2}): {self.num_samples} samples = "
                f"{self.audio_seconds:.3f} s at {self.sample_rate:g} Hz, but {self.num_labels} labels = "
                f"{self.label_seconds:.3f} s at {self.label_rate:g} labels/s (about "
                f"{round(self.audio_seconds * self.label_rate)} expected; the durations differ by "
                f"{abs(self.audio_seconds - self.label_seconds):.3f} s > {self.tol:g} s)")


def verify_label_lengths(audio_sizes: np.ndarray, label_lengths: np.ndarray, sample_rate: float,
                         label_rate: float, tol: float = DEFAULT_TOLERANCE) -> list[LabelLengthProblem]:
    """Entries whose label count disagrees with their audio length.

    An entry is a problem when ``|num_samples / sample_rate - num_labels / label_rate| > tol`` seconds
    (fairseq: ``frames = num_samples / sample_rate * label_rate`` within 0.1 s). MFCC labels (100 Hz,
    25 ms windows) are ~1.5 frames short of ``T / 160``; layer labels (50 Hz) ~1 frame short of
    ``T / 320``: both well within 0.1 s, while a wrong label rate is off by a factor.

    Args:
        audio_sizes: ``(N,)`` samples of each manifest entry.
        label_lengths: ``(N,)`` labels of each entry (aligned with ``audio_sizes``).
        sample_rate: audio samples per second.
        label_rate: labels per second (``task.label_rate``).
        tol: tolerance in seconds.
    """
    sizes = np.asarray(audio_sizes, dtype=np.int64)
    lengths = np.asarray(label_lengths, dtype=np.int64)
    if sizes.shape != lengths.shape:
        raise LabelError(f"{len(lengths)} label lines for {len(sizes)} manifest entries: label files must "
                         "have exactly one line per TSV entry")
    if label_rate <= 0 or sample_rate <= 0:
        raise LabelError(f"sample_rate ({sample_rate}) and label_rate ({label_rate}) must be positive")
    bad = np.flatnonzero(np.abs(sizes / sample_rate - lengths / label_rate) > tol)
    return [LabelLengthProblem(int(i), int(sizes[i]), int(lengths[i]), sample_rate, label_rate, tol) for i in bad]


def read_label_lengths(path: str | Path) -> np.ndarray:
    """Labels per line of a label file (``<split>.km``) -> int64 ``(lines,)``."""
    try:
        with open(path) as fh:
            return np.array([len(line.split()) for line in fh], dtype=np.int64)
    except FileNotFoundError:
        raise LabelError(f"label file not found: {path} (make it with 'speechssl label')") from None


def dictionary_text(k: int) -> str:
    """``dict.km.txt`` for ``k`` clusters: ``<id> 1`` per line, ids ``0 .. k-1`` (fairseq's format)."""
    if k < 1:
        raise LabelError(f"a label dictionary needs at least one cluster, got k={k}")
    return "".join(f"{i} 1\n" for i in range(k))


def check_dictionary(path: str | Path, num_clusters: int) -> list[str]:
    """Problems of a ``dict.km.txt`` for labels ``0 .. num_clusters-1``: empty, malformed, or missing ids
    (labels missing from the dictionary would all become ``<unk>`` in training)."""
    path = Path(path)
    symbols, problems = [], []
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        fields = line.split()
        if len(fields) != 2 or not fields[1].lstrip("-").isdigit():
            problems.append(f"{path}:{lineno}: expected '<cluster id> <count>', got {line!r}")
        else:
            symbols.append(fields[0])
    if not symbols:
        return problems + [f"{path}: the dictionary is empty: every label would map to <unk>"]
    missing = sorted(set(range(num_clusters)) - {int(s) for s in symbols if s.isdigit()})
    if missing:
        problems.append(f"{path}: {len(missing)} of the {num_clusters} cluster ids are missing "
                        f"(first: {missing[:5]}); they would map to <unk>")
    return problems


def labels_to_text(labels: np.ndarray, lengths: np.ndarray) -> str:
    """Frame labels ``(F,)`` of utterances of ``lengths`` ``(U,)`` frames -> ``U`` lines of ids."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if int(lengths.sum()) != len(labels):
        raise LabelError(f"{len(labels)} frame labels for utterances totalling {int(lengths.sum())} frames")
    tokens = np.array([str(i) for i in range(int(labels.max(initial=0)) + 1)], dtype=object)[labels]
    seps = np.full(len(labels), " ", dtype=object)
    ends = np.cumsum(lengths)[lengths > 0] - 1
    seps[ends] = "\n"
    out = np.empty(2 * len(labels), dtype=object)
    out[0::2], out[1::2] = tokens, seps
    text = "".join(out.tolist())
    if (lengths == 0).any():  # utterances without frames get empty lines, in their place
        lines = iter(text.splitlines())
        text = "".join((next(lines) if n else "") + "\n" for n in lengths.tolist())
    return text


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


@dataclass
class LabelReport:
    labels: Path  # <split>.km
    dictionary: Path  # dict.km.txt
    utterances: int
    frames: int
    k: int
    clusters_used: int
    label_rate: float


def _parts_dir(out: Path, split: str) -> Path:
    return out / f".{split}.km.parts"


def label_shard(features: FeatureSet, shard: int, model: "KMeansModel", device: str, rows: int = 1 << 16
                ) -> np.ndarray:
    """Cluster ids ``(frames,)`` int64 of one feature shard, assigned block by block."""
    from tqdm import tqdm

    data = features.shards[shard].data
    out = np.empty(data.shape[0], dtype=np.int64)
    for start in tqdm(range(0, data.shape[0], rows), desc=f"label shard {shard}", unit="block", disable=None):
        out[start : start + rows] = model.predict(data[start : start + rows], device).numpy()
    return out


def write_labels(manifest_dir: str | Path, split: str, features_dir: str | Path, km_path: str | Path,
                 out: Optional[str | Path] = None, label_rate: Optional[float] = None,
                 tol: float = DEFAULT_TOLERANCE, force: bool = False, device: str = "auto",
                 shard: Optional[int] = None, nshard: Optional[int] = None,
                 log: Callable[[str], None] = print) -> Optional[LabelReport]:
    """Label ``<manifest_dir>/<split>.tsv`` from its features with the k-means model ``km_path``.

    Each feature shard is labeled into ``<out>/.<split>.km.parts/`` (resumable: a part made with the
    same k-means model and features is reused). When every part exists, the labels are checked
    (:func:`verify_label_lengths` at ``label_rate``, default the features' frame rate) and written
    atomically as ``<out>/<split>.km`` plus ``<out>/dict.km.txt``; the parts are then removed. With
    ``shard`` (or under torchrun) only that shard is labeled; whoever completes the last part writes the
    files. Returns the report, or None when parts are still missing.

    Raises :class:`LabelError` if the labels fail the checks (nothing is written), if the features were
    extracted from another version of the TSV, or if ``<split>.km`` / a different ``dict.km.txt`` exists
    and ``force`` is not set.
    """
    from speechssl.cluster.kmeans import KMeansModel
    from speechssl.data.dataset import read_manifest

    manifest_dir = Path(manifest_dir)
    out = Path(out) if out is not None else manifest_dir
    tsv = manifest_dir / f"{split}.tsv"
    manifest = read_manifest(tsv)
    label_path, dict_path = out / f"{split}.km", out / "dict.km.txt"
    if label_path.exists() and not force:
        raise LabelError(f"{label_path} exists; pass --force to replace it")
    model = KMeansModel.load(km_path)
    dict_text = dictionary_text(model.k)
    if dict_path.exists() and dict_path.read_text() != dict_text and not force:
        raise LabelError(f"{dict_path} exists for another number of clusters than this model's {model.k}; "
                         "pass --force to replace it (or use --out)")
    features = FeatureSet.open(features_dir, split, nshard)
    if features.meta.get("manifest_sha1") != file_sha1(tsv):
        raise LabelError(f"the features in {features_dir} were extracted from another version of {tsv} "
                         f"({features.meta.get('manifest')}); re-extract them with --force")
    if features.dim != model.dim:
        raise LabelError(f"features of dimension {features.dim} in {features_dir}, but {km_path} was fit on "
                         f"{model.dim}-d features")
    n = len(features.shards)
    todo, n_req = resolve_shards(shard, nshard or n)
    if n_req != n:
        raise LabelError(f"{features_dir} holds {n} shards of '{split}': label them with --nshard {n} "
                         f"(or {n} torchrun processes), not {n_req}")

    parts = _parts_dir(out, split)
    km_sha1 = file_sha1(km_path)

    def finished(i: int) -> Optional[dict]:
        """The part's record if shard i was labeled with this model from these features."""
        try:
            info = json.loads((parts / f"{split}_{i}_{n}.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        same = info.get("km_sha1") == km_sha1 and info.get("features") == features.shards[i].meta
        return info if same and (parts / f"{split}_{i}_{n}.km").is_file() else None

    for i in todo:
        part = parts / f"{split}_{i}_{n}.km"
        if finished(i) is not None:
            log(f"labels of shard {i}/{n} of '{split}' already done: {part}")
            continue
        with contextlib.suppress(FileNotFoundError):
            part.with_suffix(".json").unlink()
        labels = label_shard(features, i, model, device)
        atomic_write_text(part, labels_to_text(labels, features.shards[i].lengths))
        info = {"km_sha1": km_sha1, "features": features.shards[i].meta,
                "counts": np.bincount(labels, minlength=model.k).tolist()}
        atomic_write_text(part.with_suffix(".json"), json.dumps(info, sort_keys=True) + "\n")
        log(f"labeled shard {i}/{n} of '{split}': {len(labels)} frames")

    records = [finished(i) for i in range(n)]
    if any(r is None for r in records):
        log(f"{sum(r is not None for r in records)} of {n} shards of '{split}' labeled; the run that labels "
            f"the last one writes {label_path}")
        return None

    rate = label_rate if label_rate is not None else features.rate
    empty = np.flatnonzero(features.lengths == 0)
    if len(empty):
        raise LabelError(f"{len(empty)} utterances of {tsv} have no frames (shorter than one analysis window), "
                         f"e.g. entry {empty[0]} (TSV line {empty[0] + 2}, {manifest.sizes[empty[0]]} samples); "
                         "drop them from the manifest ('speechssl manifest --min-seconds')")
    problems = verify_label_lengths(manifest.sizes, features.lengths, features.meta["sample_rate"], rate, tol)
    if problems:
        shown = "\n".join(f"  {p}" for p in problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise LabelError(f"{len(problems)} of {len(features.lengths)} utterances of {tsv} have a label count that "
                         f"does not match their duration at label rate {rate:g}/s (features: "
                         f"{features.rate:g} frames/s):\n{shown}{more}\nNothing was written. Check --label-rate "
                         "(MFCC: 100, layer features of a 320x model at 16 kHz: 50) and the features")
    counts = np.sum([r["counts"] for r in records], axis=0)
    atomic_write_text(dict_path, dict_text)
    dict_problems = check_dictionary(dict_path, model.k)
    if dict_problems:
        raise LabelError("\n".join(dict_problems))
    try:
        text = "".join((parts / f"{split}_{i}_{n}.km").read_text() for i in range(n))
    except FileNotFoundError:  # a process that finished its shard at the same time merged them first
        if label_path.exists():
            log(f"{label_path} was written by another process")
            return None
        raise
    atomic_write_text(label_path, text)
    shutil.rmtree(parts, ignore_errors=True)
    report = LabelReport(label_path, dict_path, len(features.lengths), features.num_frames, model.k,
                         int((counts > 0).sum()), rate)
    log(f"wrote {label_path} ({report.utterances} utterances, {report.frames} frames at {rate:g} labels/s, "
        f"{report.clusters_used} of {model.k} clusters used) and {dict_path}")
    return report
