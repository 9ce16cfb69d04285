"""Benchmark the ``speechssl manifest`` scan: files per second on N small FLAC files.

Generates N (default 5000) short FLAC files (1-3 s of noise, 16 kHz, LibriSpeech layout with
transcripts) in a temporary folder, then times, best of --repeats runs (files warm in the page cache):

  naive     a single-process ``soundfile.info`` loop over the files (reference: header only);
  probe     speechssl's probe (header + decoding the last frames + NaN checks of float files), in one
            process and in --workers processes;
  manifest  the whole ``build_manifest`` (walk, probe, transcripts, valid split, atomic writes).
Runs are interleaved, so load from other processes affects each alike; the load average is printed.

  python tools/bench_manifest_scan.py [--files 5000] [--workers N] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import numpy as np
import soundfile as sf

from speechssl.data.manifest import build_manifest
from speechssl.data.manifest_scan import default_workers, discover, probe_files


def make_corpus(root: str, n_files: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    per_chapter = 50
    for start in range(0, n_files, per_chapter):
        spk, chapter = start // (per_chapter * 4), start // per_chapter
        d = os.path.join(root, str(spk), str(chapter))
        os.makedirs(d, exist_ok=True)
        lines = []
        for i in range(start, min(start + per_chapter, n_files)):
            utt = f"{spk}-{chapter}-{i:06d}"
            n = int(rng.integers(16000, 48000))
            sf.write(os.path.join(d, utt + ".flac"), (rng.standard_normal(n) * 0.05).astype(np.float32), 16000)
            lines.append(f"{utt} THE QUICK BROWN FOX {i}")
        with open(os.path.join(d, f"{spk}-{chapter}.trans.txt"), "w") as fh:
            fh.write("\n".join(lines) + "\n")


def best_times(fns: dict, repeats: int) -> dict[str, float]:
    """Best wall time of each function; runs are interleaved so that load from other processes on
    a shared machine hits every variant alike."""
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=5000)
    ap.add_argument("--workers", type=int, default=default_workers())
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    tmp = tempfile.mkdtemp(prefix="bench_manifest_")
    try:
        audio, out = os.path.join(tmp, "audio"), os.path.join(tmp, "out")
        t0 = time.perf_counter()
        make_corpus(audio, args.files)
        print(f"generated {args.files} FLAC files in {time.perf_counter() - t0:.1f} s; workers={args.workers}")
        rels = discover(audio).audio
        paths = [os.path.join(audio, r) for r in rels]
        assert len(rels) == args.files

        t = best_times(
            {
                "naive sf.info loop, 1 process": lambda: [sf.info(p) for p in paths],
                "speechssl probe, 1 process": lambda: probe_files(audio, rels, 1, quiet=True),
                f"speechssl probe, {args.workers} workers": lambda: probe_files(audio, rels, args.workers, quiet=True),
                f"build_manifest, {args.workers} workers": lambda: build_manifest(
                    audio, out, workers=args.workers, force=True, quiet=True
                ),
            },
            args.repeats,
        )
        naive = t["naive sf.info loop, 1 process"]
        for name, seconds in t.items():
            print(f"{name:<34} {args.files / seconds:8.0f} files/s  {naive / seconds:5.2f}x the naive loop")
        print(f"load average (1 min) at the end: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
