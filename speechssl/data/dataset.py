"""Audio dataset over a fairseq manifest, with fairseq's cropping, padding and normalization semantics.

Manifest (``train.tsv``; the format of fairseq's ``wav2vec_manifest.py``)::

    /abs/path/to/audio/root
    speaker1/utt1.flac<TAB>243200
    speaker1/utt2.flac<TAB>162400

Optional label files (``train.ltr``, ``train.km``, ...) hold one line per manifest entry, aligned line
by line; they are handed through untouched (``item["labels"]``) for the task to turn into targets.

Crops are decided by the batch sampler (:mod:`speechssl.data.batching`), not here: the sampler asks for
``dataset[(index, target_len, epoch)]`` so that every item of a batch is cut to the same length (the
shortest in the batch, or padded to the longest with ``task.enable_padding``), and the random crop
offset is a pure function of ``(seed, epoch, index)``. Nothing depends on worker RNG state, so an
interrupted run that resumes mid-epoch reads exactly the same audio.

Only the cropped window is decoded (soundfile seeks), except with ``normalize``: fairseq normalizes the
whole utterance before cropping, so then the whole file is read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from speechssl.data.audio import read_audio

ItemKey = tuple[int, int, int]  # (index, target_len, epoch)


class ManifestError(ValueError):
    """A manifest or label file is malformed; the message names the file and line."""

    # torch's DataLoader re-raises an error of a worker process as ``cls(message=<its traceback as text>)``
    # when the class has a ``message`` attribute: keep the original message, drop the traceback.
    message = "manifest error"

    def __init__(self, text: str = "", *, message: Optional[str] = None):
        if message is not None:
            marker = f"{type(self).__name__}: "
            text = message.rsplit(marker, 1)[-1].strip() if marker in message else message
        super().__init__(text)


@dataclass(frozen=True)
class Manifest:
    path: Path
    root: Path
    files: list[str]  # paths relative to root
    sizes: np.ndarray  # int64 [N], samples per file
    line_numbers: Optional[np.ndarray] = None  # int64 [N], line of each entry in the file (1-based)

    def line(self, entry: int) -> int:
        """Line of ``entry`` in the manifest file (1-based; line 1 is the root)."""
        return int(self.line_numbers[entry]) if self.line_numbers is not None else entry + 2


STAT_THREADS = 32  # stats in flight: a network filesystem answers them in parallel


def missing_audio(manifest: Manifest, threads: int = STAT_THREADS) -> list[int]:
    """Entries of ``manifest`` whose audio file does not exist (one stat per file, in parallel threads)."""
    from concurrent.futures import ThreadPoolExecutor

    paths = [os.path.join(manifest.root, f) for f in manifest.files]
    chunk = 1024  # stats per task: a thread pool's per-task overhead would dominate a local disk's stat
    chunks = [paths[i : i + chunk] for i in range(0, len(paths), chunk)]
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(chunks)))) as pool:  # stat releases the GIL
        exists = [ok for part in pool.map(lambda ps: [os.path.isfile(p) for p in ps], chunks) for ok in part]
    return [i for i, ok in enumerate(exists) if not ok]


def check_audio_exists(manifest: Manifest, shown: int = 10) -> None:
    """Raise ManifestError listing every missing audio file of ``manifest`` (the first ``shown`` by name)."""
    missing = missing_audio(manifest)
    if not missing:
        return
    lines = [f"  line {manifest.line(i)}: {manifest.root / manifest.files[i]}" for i in missing[:shown]]
    more = [f"  ... and {len(missing) - shown} more"] if len(missing) > shown else []
    raise ManifestError(
        f"{manifest.path}: {len(missing)} of {len(manifest.files)} listed audio files are missing:\n"
        + "\n".join(lines + more)
        + f"\nrestore them, or rebuild the manifest; 'speechssl manifest --check {manifest.path.parent}' lists every "
        "problem of a manifest folder")


def _text_lines(path: Path, what: str) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise ManifestError(f"{path}: not a text file ({what})") from None


def read_manifest(path: str | Path) -> Manifest:
    """Parse a manifest TSV (first line: root directory; then ``relpath<TAB>num_samples``)."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest not found: {path} (make one with 'speechssl manifest AUDIO_DIR OUT_DIR')")
    lines = _text_lines(path, "a manifest is text: the audio root, then 'path<TAB>num_samples' lines")
    if not lines or not lines[0].strip():
        raise ManifestError(f"{path}: empty manifest; line 1 must be the audio root directory")
    root = Path(lines[0].strip())
    files, sizes, numbers = [], [], []
    for lineno, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) < 2:
            raise ManifestError(f"{path}:{lineno}: expected 'relative/path<TAB>num_samples', got {line!r}")
        try:
            n = int(parts[1])
        except ValueError:
            raise ManifestError(f"{path}:{lineno}: num_samples must be an integer, got {parts[1]!r}") from None
        files.append(parts[0])
        sizes.append(n)
        numbers.append(lineno)
    return Manifest(path=path, root=root, files=files, sizes=np.asarray(sizes, dtype=np.int64),
                    line_numbers=np.asarray(numbers, dtype=np.int64))


def normalize_wave(x: np.ndarray, window: slice = slice(None)) -> np.ndarray:
    """``x[window]`` normalized with the mean and variance of the whole utterance ``x`` (fairseq:
    ``F.layer_norm(wav, wav.shape)``, eps 1e-5, then the crop); statistics accumulated in float64."""
    mean = x.mean(dtype=np.float64)
    scale = 1.0 / np.sqrt(x.var(dtype=np.float64) + 1e-5)
    return (x[window] - np.float32(mean)) * np.float32(scale)


class AudioDataset(torch.utils.data.Dataset):
    """Utterances of one manifest, indexed ``0..len-1`` after dropping those shorter than ``min_sample_size``.

    Args:
        manifest: path of the ``.tsv`` manifest.
        sample_rate: every file must have this rate (checked on read; the error names the file).
        max_sample_size: crop to at most this many samples (None: no cap).
        min_sample_size: drop utterances with fewer samples (``num_dropped`` counts them).
        normalize: per-utterance zero mean / unit variance.
        pad: pad to the longest utterance of a batch instead of cropping to the shortest.
        random_crop: random crop offsets (else crops start at sample 0).
        seed: seeds the crop offsets together with the epoch and the index.
        label_files: files aligned line by line with the manifest entries.
        check_files: check at once that every listed audio file exists (a stat each, in parallel), so that a
            missing file is reported now, all of them together, not when its batch comes.
    """

    def __init__(
        self,
        manifest: str | Path,
        sample_rate: int,
        max_sample_size: Optional[int] = None,
        min_sample_size: Optional[int] = None,
        normalize: bool = False,
        pad: bool = False,
        random_crop: bool = True,
        seed: int = 1,
        label_files: Sequence[str | Path] = (),
        check_files: bool = True,
    ):
        self.manifest = read_manifest(manifest)
        if check_files:
            check_audio_exists(self.manifest)
        self.sample_rate = sample_rate
        self.max_sample_size = max_sample_size
        self.normalize = normalize
        self.pad = pad
        self.random_crop = random_crop
        self.seed = seed
        sizes = self.manifest.sizes
        keep = sizes >= (min_sample_size or 0)
        self.num_dropped = int((~keep).sum())
        self.line_index = np.flatnonzero(keep)  # manifest entry of each kept item
        self.sizes = sizes[keep]
        if len(self.sizes) == 0:
            raise ManifestError(
                f"{self.manifest.path}: no utterance is at least task.min_sample_size={min_sample_size} samples "
                f"long ({self.num_dropped} dropped); lower task.min_sample_size"
            )
        self.labels = [self._read_labels(Path(p)) for p in label_files]

    def _read_labels(self, path: Path) -> list[str]:
        if not path.is_file():
            raise ManifestError(f"label file not found: {path} (expected one line per entry of {self.manifest.path})")
        lines = _text_lines(path, "a label file is UTF-8 text, one line per manifest entry")
        if len(lines) != len(self.manifest.files):
            raise ManifestError(
                f"{path}: {len(lines)} lines but {self.manifest.path} has {len(self.manifest.files)} entries; "
                "label files must be aligned line by line with the manifest"
            )
        return [lines[i] for i in self.line_index]

    def __len__(self) -> int:
        return len(self.sizes)

    @property
    def batch_sizes(self) -> np.ndarray:
        """Samples each item occupies in a batch: its length capped at ``max_sample_size``."""
        if self.max_sample_size is None:
            return self.sizes
        return np.minimum(self.sizes, self.max_sample_size)

    def target_len(self, indices: np.ndarray) -> int:
        """Length a batch of these items is cut to: shortest (or longest with ``pad``), capped."""
        sizes = self.batch_sizes[indices]
        return int(sizes.max() if self.pad else sizes.min())

    def path(self, index: int) -> Path:
        return self.manifest.root / self.manifest.files[self.line_index[index]]

    def crop_offset(self, index: int, target_len: int, epoch: int) -> int:
        excess = int(self.sizes[index]) - target_len
        if excess <= 0 or not self.random_crop:
            return 0
        rng = np.random.default_rng((self.seed, epoch, index))
        return int(rng.integers(0, excess + 1))

    def __getitem__(self, key: ItemKey | int) -> dict[str, Any]:
        """``key`` = (index, target_len, epoch) from the batch sampler, or a bare index (whole utterance,
        capped at ``max_sample_size``, epoch 0). Returns id, source (float32 [T]), offset, labels."""
        if isinstance(key, (tuple, list)):
            index, target_len, epoch = (int(k) for k in key)
        else:
            index, epoch = int(key), 0
            target_len = int(self.batch_sizes[index])
        size = int(self.sizes[index])
        length = min(size, target_len)
        offset = self.crop_offset(index, target_len, epoch)
        path = self.path(index)
        if self.normalize:
            wav = normalize_wave(self._read(path, size, 0, index), slice(offset, offset + length))
        else:
            wav = self._read(path, length, offset, index)
        return {
            "id": index,
            "source": wav,
            "offset": offset,
            "labels": tuple(lab[index] for lab in self.labels),
        }

    def where(self, index: int) -> str:
        """``manifest.tsv:LINE`` of item ``index``."""
        return f"{self.manifest.path}:{self.manifest.line(int(self.line_index[index]))}"

    def _read(self, path: Path, frames: int, start: int, index: int) -> np.ndarray:
        try:
            wav, sr = read_audio(path, frames=frames, start=start)
        except Exception as exc:  # soundfile raises LibsndfileError/RuntimeError/OSError
            why = "no such file" if not path.exists() else str(exc)
            raise ManifestError(f"cannot read {path} ({why}), listed at {self.where(index)}; restore the file or "
                                f"rebuild the manifest ('speechssl manifest --check {self.manifest.path.parent}' "
                                "lists every problem)") from None
        if sr != self.sample_rate:
            raise ManifestError(
                f"{path}: sample rate {sr} Hz, but task.sample_rate is {self.sample_rate} (listed at "
                f"{self.where(index)}); resample the corpus (e.g. 'sox in.flac -r {self.sample_rate} out.flac') and "
                "rebuild the manifest")
        if wav.ndim == 2:  # fairseq averages channels
            wav = wav.mean(axis=1)
        if len(wav) != frames:
            raise ManifestError(
                f"{path}: read {len(wav)} samples from offset {start} but expected {frames} (listed at "
                f"{self.where(index)}); the file is shorter than {self.manifest.path.name} says: rebuild the manifest")
        return wav.astype(np.float32, copy=False)


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack items into a batch.

    Returns ``id`` (LongTensor [B]), ``source`` (FloatTensor [B, T]), ``padding_mask`` (BoolTensor [B, T],
    True = padding; None when no item is padded), ``audio_samples`` (int, real samples in the batch),
    ``offsets`` (LongTensor [B], crop start of each item) and ``labels`` (per item, a tuple with one raw
    line per label file).
    """
    lengths = np.fromiter((len(it["source"]) for it in items), dtype=np.int64, count=len(items))
    longest = int(lengths.max())
    if (lengths == longest).all():
        source = torch.from_numpy(np.stack([it["source"] for it in items]))
        padding_mask = None
    else:
        source = torch.zeros(len(items), longest)
        for row, it in zip(source, items):
            row[: len(it["source"])] = torch.from_numpy(it["source"])
        padding_mask = torch.arange(longest)[None, :] >= torch.from_numpy(lengths)[:, None]
    return {
        "id": torch.tensor([it["id"] for it in items], dtype=torch.long),
        "source": source,
        "padding_mask": padding_mask,
        "audio_samples": int(lengths.sum()),
        "offsets": torch.tensor([it["offset"] for it in items], dtype=torch.long),
        "labels": [it["labels"] for it in items],
    }


Collater = Callable[[list[dict[str, Any]]], dict[str, Any]]


def dataset_for_split(cfg: Any, split: str, label_exts: Sequence[str] = ()) -> AudioDataset:
    """The :class:`AudioDataset` of ``task.data/<split>.tsv`` with the ``task.*`` settings of ``cfg``
    (a :class:`speechssl.config.Config`); label files ``<split>.<ext>`` from ``task.label_dir`` or
    ``task.data``."""
    t = cfg.task
    data = Path(t.data)
    if not data.is_dir():
        raise ManifestError(f"task.data={t.data}: not a directory; point it at the folder holding {split}.tsv "
                            "(made by 'speechssl manifest')")
    label_dir = Path(t.label_dir) if t.label_dir else data
    return AudioDataset(
        data / f"{split}.tsv", sample_rate=t.sample_rate, max_sample_size=t.max_sample_size,
        min_sample_size=t.min_sample_size, normalize=t.normalize, pad=t.enable_padding,
        random_crop=t.random_crop, seed=cfg.common.seed,
        label_files=[label_dir / f"{split}.{ext}" for ext in label_exts],
    )
