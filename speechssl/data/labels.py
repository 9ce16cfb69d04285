"""Frame-label targets for HuBERT pretraining: dictionaries, start-up checks, cropping and collation.

Files (fairseq's ``hubert_pretraining`` task; written by ``speechssl label``): for each label name
``L`` in ``task.labels`` (e.g. ``km``), ``<label_dir>/<split>.L`` holds one line of space-separated
symbols per manifest entry, at ``task.label_rate`` labels per second, and ``<label_dir>/dict.L.txt``
one ``<symbol> <count>`` line per class: the class index of a symbol is its line number (0-based). Unlike
fairseq's ``Dictionary`` there are no special symbols: a symbol missing from the dictionary is an
error, never a silent ``<unk>``.

Start-up checks (:func:`check_label_lengths`, run by the pretraining task on every split): each
utterance's label count must match its audio length at the label rate within 0.1 s
(:func:`speechssl.cluster.label.verify_label_lengths`, as fairseq's HuBERT dataset); the error names the
utterances, the numbers, and the label rate the counts suggest.

Cropping (fairseq's ``HubertDataset.collater_frm_label``): an item cropped to ``[offset, offset + T)``
samples takes labels ``[round(offset * r), round(offset * r) + n)`` with ``r = label_rate / sample_rate``
and ``n = round(T_batch * r)``, shortened so that every item of a cropped batch has ``n`` labels; with
``task.enable_padding`` shorter label sequences are padded with -1 (never predicted).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from speechssl.cluster.label import DEFAULT_TOLERANCE, verify_label_lengths
from speechssl.data.dataset import AudioDataset, ManifestError, collate

PAD = -1  # label value of positions past the end of an utterance's labels


class LabelDictionary:
    """Symbols of a ``dict.<label>.txt`` in class-index order.

    ``encode(line)`` turns a label line into an int64 array of class indices; integer symbols (k-means
    ids) go through a lookup table, others through a dict.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise ManifestError(f"label dictionary not found: {self.path} (written by 'speechssl label' beside the "
                                "label files; point task.label_dir at their folder)")
        try:
            text = self.path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ManifestError(f"{self.path}: not UTF-8 text (a dictionary: '<symbol> <count>' per line)") from None
        symbols = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            fields = line.split()
            if len(fields) != 2:
                raise ManifestError(f"{self.path}:{lineno}: expected '<symbol> <count>', got {line!r}")
            symbols.append(fields[0])
        if not symbols:
            raise ManifestError(f"{self.path}: the label dictionary is empty (0 classes): there is nothing to "
                                "predict; rebuild it with 'speechssl label' (one '<cluster id> 1' line per cluster)")
        if len(set(symbols)) != len(symbols):
            raise ManifestError(f"{self.path}: duplicate symbols in the label dictionary")
        self.symbols = symbols
        self.index = {s: i for i, s in enumerate(symbols)}
        self._lut = None
        if all(s.isdigit() for s in symbols):
            self._lut = np.full(max(int(s) for s in symbols) + 1, PAD, dtype=np.int64)
            self._lut[[int(s) for s in symbols]] = np.arange(len(symbols))

    def __len__(self) -> int:
        return len(self.symbols)

    def encode(self, line: str, where: str = "") -> np.ndarray:
        """Class indices ``(N,)`` int64 of a label line; unknown symbols raise ManifestError naming ``where``."""
        tokens = line.split()
        if self._lut is not None:
            try:
                ids = np.array(tokens, dtype=np.int64)
            except ValueError:
                ids = None
            if ids is not None:
                ok = (ids >= 0) & (ids < len(self._lut))
                out = self._lut[np.where(ok, ids, 0)]
                out[~ok] = PAD
                if (out >= 0).all():
                    return out
        else:
            out = np.array([self.index.get(t, PAD) for t in tokens], dtype=np.int64)
            if (out >= 0).all():
                return out
        bad = sorted({t for t in tokens if t not in self.index})
        raise ManifestError(f"{where}: label(s) {bad[:5]} are not in {self.path} ({len(self)} classes); the labels "
                            "and the dictionary come from different k-means runs: relabel with 'speechssl label'")


def label_counts(lines: Sequence[str]) -> np.ndarray:
    """Labels per line (single-space separated, as ``speechssl label`` and fairseq write them)."""
    return np.fromiter((ln.strip().count(" ") + 1 if ln.strip() else 0 for ln in lines), dtype=np.int64,
                       count=len(lines))


def _measured_rate(counts: np.ndarray, seconds: np.ndarray) -> float:
    """Labels per second: the slope of counts over durations (robust to the frame or two every utterance
    lacks), or the median ratio when all utterances have the same length."""
    if len(seconds) > 1 and np.ptp(seconds) > 0.1:
        return float(np.polyfit(seconds, counts, 1)[0])
    return float(np.median(counts / seconds))


def _likely_rate(measured: float) -> float:
    """The usual label rate (MFCC 100/s, 20 ms frames 50/s, ...) within 5% of ``measured``, else it rounded.
    Counts run a frame or two short of ``duration x rate`` (analysis windows), hence the tolerance."""
    for rate in (100.0, 50.0, 25.0, 200.0):
        if abs(measured - rate) <= 0.05 * rate:
            return rate
    return float(round(measured))


def check_label_lengths(dataset: AudioDataset, label_names: Sequence[str], label_rate: float,
                        tol: float = DEFAULT_TOLERANCE, shown: int = 10) -> None:
    """Raise ManifestError if an utterance's label count does not match its duration at ``label_rate``.

    The message names the label file, the utterances (path and TSV line) with their numbers, and the
    label rate the counts suggest (the median of labels per second), e.g. 50 for labels given with
    ``task.label_rate=100``.
    """
    sr = dataset.sample_rate
    for name, lines in zip(label_names, dataset.labels):
        counts = label_counts(lines)
        problems = verify_label_lengths(dataset.sizes, counts, sr, label_rate, tol)
        if not problems:
            continue
        implied = _likely_rate(_measured_rate(counts, dataset.sizes / sr))
        hint = (f"the labels look like {implied:g} labels/s, not {label_rate:g}: set "
                f"task.label_rate={implied:g} if that is their rate, else regenerate them ('speechssl label')"
                if abs(implied - label_rate) > 0.05 * label_rate else
                "regenerate the labels of the mismatched utterances ('speechssl label')")
        rows = [f"  {dataset.path(p.index)} (TSV line {int(dataset.line_index[p.index]) + 2}): {p.num_samples} "
                f"samples = {p.audio_seconds:.3f} s, {p.num_labels} labels = {p.label_seconds:.3f} s at "
                f"{label_rate:g}/s (about {round(p.audio_seconds * label_rate)} expected)" for p in problems[:shown]]
        more = [f"  ... and {len(problems) - shown} more"] if len(problems) > shown else []
        raise ManifestError("\n".join(
            [f"{len(problems)} of {len(dataset)} utterances of {dataset.manifest.path} have a label count in "
             f"{name} labels that does not match their audio length at task.label_rate={label_rate:g} "
             f"(tolerance {tol:g} s); {hint}:"] + rows + more))


class LabelCollater:
    """``collate`` plus ``target_list``: one ``(B, N)`` int64 tensor per label set (pad -1).

    Picklable (it runs in DataLoader workers). Args: the dictionaries (one per label set, in
    ``task.labels`` order), ``label_rate`` and ``sample_rate``, ``pad`` (``task.enable_padding``).
    """

    def __init__(self, dictionaries: Sequence[LabelDictionary], label_rate: float, sample_rate: int,
                 pad: bool = False):
        self.dictionaries = list(dictionaries)
        self.ratio = label_rate / sample_rate
        self.pad = pad

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        batch = collate(items)
        size = int(batch["source"].shape[1])
        starts = [int(round(int(it["offset"]) * self.ratio)) for it in items]
        full = int(round(size * self.ratio))
        targets = []
        for k, dictionary in enumerate(self.dictionaries):
            seqs = [dictionary.encode(it["labels"][k], f"labels of dataset item {int(it['id'])}") for it in items]
            n = full if self.pad else min([full] + [len(s) - st for s, st in zip(seqs, starts)])
            out = np.full((len(items), max(n, 0)), PAD, dtype=np.int64)
            for row, (s, st) in enumerate(zip(seqs, starts)):
                piece = s[st : st + n]
                out[row, : len(piece)] = piece
            targets.append(torch.from_numpy(out))
        batch["target_list"] = targets
        return batch
