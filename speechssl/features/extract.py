"""Extract the features of a manifest split into sharded, resumable feature files.

:func:`extract_split` drives an extractor (:class:`~speechssl.features.mfcc.MfccExtractor`,
:class:`~speechssl.features.layer.LayerExtractor`) over the manifest lines of each shard: audio is read
(soundfile) and ``extractor.prepare`` runs in ``num_workers`` data-loader processes with one torch thread
each; ``extractor.compute`` runs in the main process; frames go straight into the shard's memory-mapped
file (:class:`~speechssl.features.store.ShardWriter`). A finished shard made the same way is skipped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

from speechssl.data.audio import read_audio
from speechssl.features.store import (
    FeatureStoreError,
    ShardFiles,
    ShardWriter,
    file_sha1,
    resolve_shards,
    shard_range,
    shard_state,
)


@dataclass
class ShardResult:
    shard: int
    nshard: int
    files: ShardFiles
    skipped: bool  # already finished, made the same way
    utterances: int
    frames: int


class _Utterances(torch.utils.data.Dataset):
    """Reads and checks one utterance per item; returns ``(item, None)`` or ``(None, error message)``
    so that a bad file reaches the main process as a one-line error, not a worker traceback."""

    def __init__(self, paths: Sequence[Path], sizes: np.ndarray, extractor: Any):
        self.paths, self.sizes, self.extractor = list(paths), sizes, extractor

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[Any, Optional[str]]:
        path, sr_expected = self.paths[i], self.extractor.sample_rate
        try:
            wave, sr = read_audio(path)
        except Exception as exc:  # soundfile raises several types; the message is what matters
            return None, f"{path}: cannot read audio ({exc}); check the manifest (speechssl manifest --check)"
        if sr != sr_expected:
            return None, (f"{path}: sample rate {sr} Hz, expected {sr_expected} Hz; make a {sr_expected} Hz "
                          "manifest ('speechssl manifest --resample-to DIR')")
        if wave.ndim != 1:
            return None, f"{path}: {wave.shape[1]} channels; features need mono audio (speechssl manifest converts)"
        if len(wave) != self.sizes[i]:
            return None, (f"{path}: {len(wave)} samples but the manifest says {self.sizes[i]}; the manifest is "
                          "stale: rebuild it (check with 'speechssl manifest --check')")
        return self.extractor.prepare(wave), None


def _one_thread(_: int) -> None:
    torch.set_num_threads(1)


def extract_split(extractor: Any, manifest_dir: str | Path, split: str, out_dir: str | Path,
                  shard: Optional[int] = None, nshard: Optional[int] = None, force: bool = False,
                  num_workers: int = 0, log: Callable[[str], None] = print) -> list[ShardResult]:
    """Features of ``<manifest_dir>/<split>.tsv`` into ``out_dir`` (see :mod:`speechssl.features.store`).

    ``shard``/``nshard``: which shards this call does (:func:`~speechssl.features.store.resolve_shards`:
    one shard, torchrun's rank, or all in turn). ``force`` redoes finished shards; without it, a finished
    shard made from another manifest or with other settings is an error.
    """
    from speechssl.data.dataset import check_audio_exists, read_manifest

    tsv = Path(manifest_dir) / f"{split}.tsv"
    manifest = read_manifest(tsv)
    if not manifest.files:
        raise FeatureStoreError(f"{tsv} lists no utterances")
    check_audio_exists(manifest)  # every missing file now, not when its shard comes
    sha1 = file_sha1(tsv)
    todo, n = resolve_shards(shard, nshard)
    results = []
    for i in todo:
        start, end = shard_range(len(manifest.files), n, i)
        files = ShardFiles.of(out_dir, split, i, n)
        identity = {"kind": extractor.kind, "settings": extractor.settings(), "dim": extractor.dim,
                    "rate": extractor.rate, "sample_rate": extractor.sample_rate, "manifest_sha1": sha1,
                    "line_start": start, "line_end": end}
        state = shard_state(files, identity)
        if state == "done" and not force:
            log(f"shard {i}/{n} of '{split}' is already done: {files.npy} (--force redoes it)")
            results.append(ShardResult(i, n, files, True, end - start, -1))
            continue
        if state not in ("done", "missing") and not force:
            raise FeatureStoreError(f"{files.npy} was made differently ({state}); pass --force to replace it, "
                                    "or use another --out")
        meta = {**identity, "split": split, "shard": i, "nshard": n, "manifest": str(tsv.resolve()),
                "manifest_lines": len(manifest.files)}
        frames = _extract_shard(extractor, manifest.root, manifest.files[start:end], manifest.sizes[start:end],
                                files, meta, num_workers, desc=f"{extractor.kind} {split} {i}/{n}")
        log(f"shard {i}/{n} of '{split}': {end - start} utterances, {frames} frames of dim {extractor.dim} "
            f"at {extractor.rate:g} Hz -> {files.npy}")
        results.append(ShardResult(i, n, files, False, end - start, frames))
    return results


def _extract_shard(extractor: Any, root: Path, rel_paths: Sequence[str], sizes: np.ndarray, files: ShardFiles,
                   meta: dict[str, Any], num_workers: int, desc: str) -> int:
    lengths = extractor.num_frames(sizes)
    paths = [root / p for p in rel_paths]
    loader = torch.utils.data.DataLoader(
        _Utterances(paths, sizes, extractor), batch_size=None, shuffle=False, num_workers=num_workers,
        worker_init_fn=_one_thread if num_workers > 0 else None, prefetch_factor=4 if num_workers > 0 else None,
    )
    with ShardWriter(files, lengths, extractor.dim) as writer:
        for j, (item, error) in enumerate(tqdm(loader, total=len(paths), desc=desc, unit="utt", mininterval=2.0,
                                               disable=None)):
            if error is not None:
                raise FeatureStoreError(error)
            writer.write(j, extractor.compute(item), name=str(paths[j]))
        writer.commit(meta)
    return int(lengths.sum())
