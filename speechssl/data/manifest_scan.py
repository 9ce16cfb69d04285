"""Finding audio files under a folder and probing them cheaply, in parallel, for ``speechssl manifest``.

Two steps:

* :func:`discover` walks a folder (recursively, following directory symlinks, skipping hidden entries)
  and returns the audio files (by extension, case-insensitive), dangling symlinks and the transcript
  files it saw, as sorted paths relative to the folder.
* :func:`probe_files` opens every file with soundfile in a process pool and returns one :class:`Probe`
  each: frames, sample rate, channels, subtype, or the reason the file is unusable. Only headers are
  read, plus the last few frames (a file cut short fails to seek or decode there), plus a full decode
  of float files (the only subtypes that can hold NaN/inf) or of every file with ``decode_all``.
"""

from __future__ import annotations

import concurrent.futures
import math
import multiprocessing
import os
import re
import sys
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import soundfile as sf

# Extension aliases for the formats libsndfile knows by another name. RAW (header-less) is never
# scanned: it cannot be read without being told its sample rate and encoding.
_EXTRA_EXTENSIONS = {
    "AIFF": ("aif", "aifc"),
    "AU": ("snd",),
    "OGG": ("oga", "opus"),
    "NIST": ("sph",),
    "IRCAM": ("sf",),
}
AUDIO_EXTENSIONS = frozenset(
    [name.lower() for name in sf.available_formats() if name != "RAW"]
    + [ext for name, exts in _EXTRA_EXTENSIONS.items() if name in sf.available_formats() for ext in exts]
)
TRANSCRIPT_SUFFIX = ".trans.txt"  # LibriSpeech: one "UTTID TEXT" line per utterance of a chapter
SIDECAR_EXTENSIONS = (".txt", ".lab")  # one transcript per audio file, same stem

FLOAT_SUBTYPES = frozenset({"FLOAT", "DOUBLE"})
_TAIL_FRAMES = 256  # decoded at the end of every file to catch truncation
_BLOCK_FRAMES = 1 << 18  # block size of full decodes
# libsndfile's header log, e.g. "data : 64000 (should be 31978)": a chunk promises more bytes than the
# file holds (data chunks of WAV/W64/AIFF, or the RIFF/riff/FORM container, which some writers get a
# few bytes wrong). 0 / 0xFFFFFFFF-like sizes are "unknown length" placeholders of streaming writers.
_SHORT_CHUNK = re.compile(r"^\s*(data|SSND|RIFF|riff|FORM)\s*:\s*(\d+)\s*\(should be (\d+)\)", re.MULTILINE)
_CONTAINER_SLACK = 8
_PLACEHOLDER_SIZE = 0x7FFFF000

# Problem categories: the first column of the skip summary. Messages add the details.
DANGLING = "dangling symlink"
MISSING = "missing file"
EMPTY = "empty file"
UNREADABLE = "unreadable"
NO_FRAMES = "no audio frames"
TRUNCATED = "truncated"
CORRUPT = "corrupt"
NON_FINITE = "NaN/inf samples"


class Probe(NamedTuple):
    """What soundfile says about one file. ``problem`` is "" for a usable file, else a category above
    and ``detail`` the one-line reason written to skipped.tsv."""

    frames: int = 0
    sample_rate: int = 0
    channels: int = 0
    subtype: str = ""
    problem: str = ""
    detail: str = ""


@dataclass
class Discovery:
    """Files found under ``root``; every path is relative to it, '/'-separated and sorted."""

    root: str
    audio: list[str] = field(default_factory=list)
    dangling: list[str] = field(default_factory=list)  # symlinks with an audio extension and no target
    transcript_files: list[str] = field(default_factory=list)  # *.trans.txt
    sidecars: dict[str, str] = field(default_factory=dict)  # path without extension -> .txt/.lab path
    errors: list[str] = field(default_factory=list)  # folders that could not be listed


def is_audio_name(name: str) -> bool:
    return name.rpartition(".")[2].lower() in AUDIO_EXTENSIONS and "." in name


def discover(root: str | os.PathLike) -> Discovery:
    """Walk ``root`` recursively. Directory symlinks are followed (each real directory once, so
    loops end); names starting with '.' are skipped (macOS ``._*`` files, editor and temp files)."""
    root = os.path.realpath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"audio folder not found: {root}")
    found = Discovery(root=root)
    seen_dirs: set[tuple[int, int]] = set()
    stack = [("", root)]
    while stack:
        rel_dir, abs_dir = stack.pop()
        try:
            st = os.stat(abs_dir)
            if (st.st_dev, st.st_ino) in seen_dirs:
                continue
            seen_dirs.add((st.st_dev, st.st_ino))
            entries = list(os.scandir(abs_dir))
        except OSError as exc:
            found.errors.append(f"cannot list folder {rel_dir or '.'}: {exc.strerror or exc}")
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            rel = f"{rel_dir}{entry.name}"
            try:
                is_dir = entry.is_dir()  # follows symlinks; False for dangling ones
            except OSError:
                is_dir = False
            if is_dir:
                stack.append((rel + "/", entry.path))
                continue
            lower = entry.name.lower()
            if is_audio_name(entry.name):
                if entry.is_symlink() and not os.path.exists(entry.path):
                    found.dangling.append(rel)
                else:
                    found.audio.append(rel)
            elif lower.endswith(TRANSCRIPT_SUFFIX):
                found.transcript_files.append(rel)
            elif lower.endswith(SIDECAR_EXTENSIONS):
                found.sidecars[rel.rpartition(".")[0]] = rel
    found.audio.sort()
    found.dangling.sort()
    found.transcript_files.sort()
    return found


def probe(path: str, decode_all: bool = False) -> Probe:
    """Probe one file; never raises. See the module docstring for what is checked."""
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        if os.path.islink(path):
            return Probe(problem=DANGLING, detail=f"dangling symlink -> {os.readlink(path)}")
        return Probe(problem=MISSING, detail="file not found")
    except OSError as exc:
        return Probe(problem=UNREADABLE, detail=f"unreadable: {exc.strerror or exc}")
    if size == 0:
        return Probe(problem=EMPTY, detail="empty file (0 bytes)")
    try:
        f = sf.SoundFile(os.fsencode(path))  # bytes: names that are not UTF-8 open too
    except Exception as exc:  # libsndfile refuses it: not audio, or a damaged header
        return Probe(problem=UNREADABLE, detail=f"unreadable: not an audio file soundfile can read ({_oneline(exc)})")
    with f:
        info = Probe(f.frames, f.samplerate, f.channels, f.subtype)
        if f.frames <= 0:
            return info._replace(problem=NO_FRAMES, detail="no audio frames (0 samples)")
        try:
            problem = _check_tail(f) or _check_header_log(f)
            if not problem and (decode_all or f.subtype in FLOAT_SUBTYPES):
                problem = _check_full_decode(f)
        except Exception as exc:
            problem = (CORRUPT, f"corrupt: decoding failed ({_oneline(exc)})")
    return info._replace(problem=problem[0], detail=problem[1]) if problem else info


def _check_tail(f: sf.SoundFile) -> tuple[str, str] | None:
    """Seek to the last frames the header promises and decode them: a file cut short fails here."""
    tail = min(f.frames, _TAIL_FRAMES)
    try:
        f.seek(f.frames - tail)
        got = len(f.read(tail, dtype="float32"))
    except Exception as exc:
        return TRUNCATED, f"truncated: header says {f.frames} frames, the last ones cannot be read ({_oneline(exc)})"
    if got < tail:
        return TRUNCATED, f"truncated: header says {f.frames} frames, the data ends {tail - got}+ frames early"
    return None


def _check_header_log(f: sf.SoundFile) -> tuple[str, str] | None:
    """WAV/AIFF cut short: libsndfile trims the frame count to the data present, and logs it."""
    for chunk, said, actual in _SHORT_CHUNK.findall(f.extra_info):
        said, actual = int(said), int(actual)
        slack = 0 if chunk in ("data", "SSND") else _CONTAINER_SLACK
        if actual + slack < said < _PLACEHOLDER_SIZE:
            return TRUNCATED, f"truncated: {chunk} chunk says {said} bytes, the file holds {actual}"
    return None


def _check_full_decode(f: sf.SoundFile) -> tuple[str, str] | None:
    f.seek(0)
    decoded = 0
    for block in f.blocks(blocksize=_BLOCK_FRAMES, dtype="float32"):
        decoded += len(block)
        if not np.isfinite(block).all():
            return NON_FINITE, "contains NaN/inf samples"
    if decoded < f.frames:
        return TRUNCATED, f"truncated: header says {f.frames} frames, {decoded} decode"
    return None


def _oneline(exc: BaseException) -> str:
    """libsndfile's own message (without soundfile's "Error opening '<path>': " prefix), on one line."""
    text = getattr(exc, "error_string", None) or str(exc)
    return " ".join(text.split()) or type(exc).__name__


def _probe_chunk(root: str, rel_paths: list[str], decode_all: bool) -> list[Probe]:
    return [probe(os.path.join(root, rel), decode_all) for rel in rel_paths]


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def progress_bar(total: int, desc: str, quiet: bool):
    """tqdm on stderr; off with ``quiet`` or when stderr is not a terminal (logs, CI)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="file", file=sys.stderr, disable=quiet or not sys.stderr.isatty())


def probe_files(
    root: str,
    rel_paths: list[str],
    workers: int | None = None,
    decode_all: bool = False,
    quiet: bool = False,
    desc: str = "scanning",
) -> list[Probe]:
    """Probe ``root/rel`` for every rel path, in order, with a pool of ``workers`` processes
    (default: all cores) over chunks of files. Returns one :class:`Probe` per path."""
    workers = workers or default_workers()
    n = len(rel_paths)
    chunk = max(32, min(2048, math.ceil(n / (workers * 16)) if n else 1))
    results: list[Probe] = []
    with progress_bar(n, desc, quiet) as bar:
        if workers == 1 or n <= 2 * chunk:
            for start in range(0, n, chunk):
                results.extend(_probe_chunk(root, rel_paths[start : start + chunk], decode_all))
                bar.update(min(chunk, n - start))
            return results
        parts: dict[int, list[Probe]] = {}
        # fork starts workers in milliseconds; they only run soundfile/numpy code (no threads, no torch).
        ctx = multiprocessing.get_context("fork") if sys.platform.startswith("linux") else None
        with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            futures = {
                pool.submit(_probe_chunk, root, rel_paths[start : start + chunk], decode_all): start
                for start in range(0, n, chunk)
            }
            for fut in concurrent.futures.as_completed(futures):
                part = fut.result()
                parts[futures[fut]] = part
                bar.update(len(part))
        for start in sorted(parts):
            results.extend(parts[start])
    return results
