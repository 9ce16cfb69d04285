"""Throughput of the pretraining input pipeline: audio seconds per second delivered as batches.

Generates a temporary corpus of FLAC files (noise + tones, lengths uniform in [--min-seconds,
--max-seconds]), writes a manifest, and iterates the same DataLoader the trainer uses
(AudioDataset + EpochBatchSampler, ``--workers`` processes with one torch thread each) over whole
epochs, reporting the audio seconds per second of wall time and batches per second. Nothing is
trained: this is the ceiling the data side puts on a training run. Compare it with a training step's
demand (the audio_sec_per_sec in a run's progress line).

Example:
  .venv/bin/python tools/bench_data_pipeline.py --workers 2                  # BASE-recipe batches
  .venv/bin/python tools/bench_data_pipeline.py --workers 2 --normalize      # LARGE (whole-file reads)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from speechssl.data.audio import write_audio  # noqa: E402
from speechssl.data.batching import EpochBatchSampler  # noqa: E402
from speechssl.data.dataset import AudioDataset, collate  # noqa: E402
from speechssl.train.loop import make_loader  # noqa: E402

SR = 16000


def make_corpus(root: Path, n_files: int, min_s: float, max_s: float, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    lines = [str(root)]
    for i in range(n_files):
        n = int(rng.uniform(min_s, max_s) * SR)
        t = np.arange(n) / SR
        x = 0.1 * rng.standard_normal(n) + 0.3 * np.sin(2 * np.pi * rng.uniform(100, 400) * t)
        write_audio(root / f"u{i:05d}.flac", x.astype(np.float32), SR)
        lines.append(f"u{i:05d}.flac\t{n}")
    manifest = root / "train.tsv"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def bench(manifest: Path, workers: int, max_tokens: int, max_sample_size: int, min_sample_size: int,
          normalize: bool, epochs: int) -> dict:
    ds = AudioDataset(manifest, SR, max_sample_size=max_sample_size, min_sample_size=min_sample_size,
                      normalize=normalize)
    sampler = EpochBatchSampler(ds.batch_sizes, ds.target_len, max_tokens=max_tokens)
    loader = make_loader(ds, sampler, collate, workers, torch.device("cpu"))
    samples = batches = 0
    start = None
    for epoch in range(1, epochs + 2):
        sampler.set_epoch(epoch)
        for batch in loader:
            if start is None:  # the first batch pays the worker start-up: not counted
                start = time.perf_counter()
                continue
            samples += batch["audio_samples"]
            batches += 1
    elapsed = time.perf_counter() - start
    return {"workers": workers, "normalize": normalize, "batches": batches, "audio_hours": samples / SR / 3600,
            "seconds": elapsed, "audio_sec_per_sec": samples / SR / elapsed, "batches_per_sec": batches / elapsed}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--files", type=int, default=300)
    p.add_argument("--min-seconds", type=float, default=2.0)
    p.add_argument("--max-seconds", type=float, default=20.0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=1_400_000, help="BASE: 1.4M samples per batch")
    p.add_argument("--max-sample-size", type=int, default=250_000)
    p.add_argument("--min-sample-size", type=int, default=32_000)
    p.add_argument("--normalize", action="store_true", help="per-utterance normalization (reads whole files)")
    p.add_argument("--epochs", type=int, default=2)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="speechssl-bench-") as tmp:
        t0 = time.perf_counter()
        manifest = make_corpus(Path(tmp), args.files, args.min_seconds, args.max_seconds)
        print(f"corpus: {args.files} FLAC files in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        res = bench(manifest, args.workers, args.max_tokens, args.max_sample_size, args.min_sample_size,
                    args.normalize, args.epochs)
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in res.items()}))
    print(f"{res['audio_sec_per_sec']:.0f} audio-seconds/s ({res['batches_per_sec']:.2f} batches/s of up to "
          f"{args.max_tokens} samples) with {args.workers} workers", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
