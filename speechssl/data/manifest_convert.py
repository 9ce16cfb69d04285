"""``speechssl manifest --resample-to DIR``: a 16 kHz mono view of a corpus.

Every kept file gets an entry under DIR at its mirrored relative path: files already at the target
rate and mono are symlinked (absolute links, no copy); the others are downmixed (mean of the channels),
resampled with :func:`speechssl._torchaudio.resample` and written as 16-bit FLAC with the extension
``.flac``. DIR is a cache owned by the command: an existing converted file is reused when it is newer
than its source and already has the expected rate, channels and length; anything else is rewritten
atomically (temp file + rename).
"""

from __future__ import annotations

import concurrent.futures
import math
import multiprocessing
import os
import tempfile
from typing import NamedTuple

import numpy as np
import soundfile as sf

from speechssl.data.audio import read_audio, write_audio
from speechssl.data.manifest_scan import progress_bar
from speechssl.utils.io import chmod_as_created


NAME_COLLISION = "name collision"  # skip categories
CONVERSION = "conversion failed"


class ConvertJob(NamedTuple):
    src: str  # absolute source path
    dst: str  # absolute path under the converted folder
    frames: int  # source frames, at sample_rate
    sample_rate: int
    channels: int

    def converted_frames(self, target_sr: int) -> int:
        """Length after resampling, as torchaudio's resample computes it: ceil(frames * new / old)."""
        g = math.gcd(self.sample_rate, target_sr)
        return math.ceil(self.frames * (target_sr // g) / (self.sample_rate // g))


def needs_conversion(sample_rate: int, channels: int, target_sr: int) -> bool:
    return sample_rate != target_sr or channels != 1


def run_job(job: ConvertJob, target_sr: int) -> tuple[int, str]:
    """Link or convert one file. Returns (frames at target_sr, "") or (0, error message)."""
    try:
        os.makedirs(os.path.dirname(job.dst), exist_ok=True)
        if not needs_conversion(job.sample_rate, job.channels, target_sr):
            _link(job.src, job.dst)
            return job.frames, ""
        expected = job.converted_frames(target_sr)
        if not _up_to_date(job, expected, target_sr):
            _convert(job, target_sr)
        return expected, ""
    except Exception as exc:
        return 0, f"{CONVERSION}: {' '.join(str(exc).split()) or type(exc).__name__}"


def _link(src: str, dst: str) -> None:
    if os.path.islink(dst) and os.readlink(dst) == src:
        return
    tmp = os.path.join(os.path.dirname(dst), f".{os.path.basename(dst)}.{os.getpid()}.link")
    if os.path.lexists(tmp):
        os.unlink(tmp)
    os.symlink(src, tmp)
    os.replace(tmp, dst)


def _up_to_date(job: ConvertJob, expected: int, target_sr: int) -> bool:
    if os.path.islink(job.dst) or not os.path.isfile(job.dst):
        return False
    if os.path.getmtime(job.dst) < os.path.getmtime(job.src):
        return False
    try:
        info = sf.info(job.dst)
    except Exception:
        return False
    return info.samplerate == target_sr and info.channels == 1 and info.frames == expected


def _convert(job: ConvertJob, target_sr: int) -> None:
    samples, sr = read_audio(job.src, dtype="float32")
    if samples.ndim == 2:
        samples = samples.mean(axis=1, dtype=np.float32)
    if sr != target_sr:
        import torch

        from speechssl._torchaudio import resample

        samples = resample(torch.from_numpy(np.ascontiguousarray(samples)), sr, target_sr).numpy()
    # resampling can overshoot full scale; libsndfile would wrap around when writing integers
    samples = np.clip(samples, -1.0, 1.0)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(job.dst)}.", suffix=".tmp.flac", dir=os.path.dirname(job.dst))
    os.close(fd)
    try:
        write_audio(tmp, samples, target_sr, subtype="PCM_16")
        chmod_as_created(tmp)  # mkstemp made it 0600
        os.replace(tmp, job.dst)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)  # one process per core already


def _run_chunk(jobs: list[ConvertJob], target_sr: int) -> list[tuple[int, str]]:
    return [run_job(job, target_sr) for job in jobs]


def run_jobs(jobs: list[ConvertJob], target_sr: int, workers: int, quiet: bool) -> list[tuple[int, str]]:
    """Run every job, in order; a process pool when several files need resampling."""
    n_convert = sum(needs_conversion(j.sample_rate, j.channels, target_sr) for j in jobs)
    results: list[tuple[int, str]] = []
    with progress_bar(len(jobs), "converting", quiet) as bar:
        if workers <= 1 or n_convert < 4 * workers:
            for job in jobs:
                results.append(run_job(job, target_sr))
                bar.update(1)
            return results
        chunk = max(1, min(64, math.ceil(len(jobs) / (workers * 8))))
        # spawn, not fork: workers run torch, which must not inherit a forked OpenMP state
        ctx = multiprocessing.get_context("spawn")
        parts = {}
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker) as pool:
            futures = {pool.submit(_run_chunk, jobs[s : s + chunk], target_sr): s for s in range(0, len(jobs), chunk)}
            for fut in concurrent.futures.as_completed(futures):
                parts[futures[fut]] = fut.result()
                bar.update(len(parts[futures[fut]]))
        for s in sorted(parts):
            results.extend(parts[s])
    return results


def convert_splits(
    by_split: dict[str, list], source_roots: dict[str, str], skip_root: str, conv_root: str, target_sr: int,
    workers: int, quiet: bool,
) -> tuple[dict[str, str], list[tuple[str, str, str]]]:
    """Link or convert every utterance of every split under ``conv_root``, mirroring its path
    relative to ``skip_root`` (the common root of the source folders).

    ``by_split``: split -> utterances (``.rel``, ``.frames``, ``.sample_rate``, ``.channels``, ``.path``),
    updated in place: converted ones get their ``.flac`` path, target-rate frame count and rate; those
    that fail are removed. Returns (split -> new root folder, [(path relative to skip_root, category,
    reason)] of the removed files)."""
    roots = {name: os.path.normpath(os.path.join(conv_root, os.path.relpath(source_roots[name], skip_root)))
             for name in by_split}
    jobs, owners, claimed, dropped = [], [], {}, []
    for name, utts in by_split.items():
        prefix = os.path.relpath(source_roots[name], skip_root)
        kept = []
        for u in utts:
            if needs_conversion(u.sample_rate, u.channels, target_sr):
                u.path = u.rel.rpartition(".")[0] + ".flac"
            dst = os.path.join(roots[name], u.path)
            if claimed.setdefault(dst, u.rel) != u.rel:
                reason = f"{NAME_COLLISION}: the converted name {u.path} is already taken by {claimed[dst]}"
                dropped.append((os.path.normpath(os.path.join(prefix, u.rel)), NAME_COLLISION, reason))
                continue
            kept.append(u)
            jobs.append(ConvertJob(os.path.join(source_roots[name], u.rel), dst, u.frames, u.sample_rate, u.channels))
            owners.append((prefix, u))
        by_split[name] = kept
    failed = set()
    for (prefix, u), (frames, error) in zip(owners, run_jobs(jobs, target_sr, workers, quiet)):
        if error:
            dropped.append((os.path.normpath(os.path.join(prefix, u.rel)), CONVERSION, error))
            failed.add(id(u))
        else:
            u.frames, u.sample_rate, u.channels = frames, target_sr, 1
    for name in by_split:
        by_split[name] = [u for u in by_split[name] if id(u) not in failed]
    return roots, dropped
