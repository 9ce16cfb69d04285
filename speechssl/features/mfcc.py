"""HuBERT iteration-1 features: 39-d Kaldi MFCC + deltas + delta-deltas at 100 frames/s.

Same computation as fairseq's ``examples/hubert/simple_kmeans/dump_mfcc_feature.py`` (the call itself is
:func:`speechssl._torchaudio.kaldi_mfcc_deltas`): 25 ms windows every 10 ms with Kaldi's ``snip_edges``,
so an utterance of ``T`` samples at 16 kHz has ``1 + (T - 400) // 160`` frames (0 below one window).

Not in fairseq: ``cmvn`` standardizes each utterance's features (Kaldi's per-utterance ``apply-cmvn`` with
variance normalization). On audio whose recording conditions change between sessions (the demo corpus:
every chapter its own microphone) k-means of raw MFCCs spends clusters on the microphones; of normalized
ones, on the sounds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

FRAME_LENGTH_MS = 25.0
FRAME_SHIFT_MS = 10.0


class MfccExtractor:
    """Feature extractor interface used by :func:`speechssl.features.extract.extract_split`:
    ``prepare(wave)`` runs in the data-loader workers (here: the whole MFCC), ``compute(item)`` in the
    main process (here: nothing left to do)."""

    kind = "mfcc"
    dim = 39

    def __init__(self, sample_rate: int = 16000, cmvn: bool = False):
        self.sample_rate = sample_rate
        self.cmvn = cmvn  # each utterance's 39 dims to zero mean, unit variance (Kaldi's apply-cmvn)
        # Kaldi: window and shift in samples are int(sr * ms / 1000)
        self.window = int(sample_rate * FRAME_LENGTH_MS * 0.001)
        self.shift = int(sample_rate * FRAME_SHIFT_MS * 0.001)
        self.rate = sample_rate / self.shift  # frames per second (100 at 16 kHz)

    def settings(self) -> dict[str, Any]:
        return {"num_ceps": 13, "deltas": 2, "frame_length_ms": FRAME_LENGTH_MS, "frame_shift_ms": FRAME_SHIFT_MS,
                "use_energy": False, "snip_edges": True, "impl": "torchaudio.compliance.kaldi.mfcc",
                "cmvn": self.cmvn}

    def num_frames(self, num_samples: np.ndarray) -> np.ndarray:
        """Frames of utterances of ``num_samples`` samples (int array)."""
        n = np.asarray(num_samples, dtype=np.int64)
        return np.where(n >= self.window, 1 + (n - self.window) // self.shift, 0)

    def prepare(self, wave: np.ndarray) -> np.ndarray:
        """``(time,)`` float32 samples -> ``(frames, 39)`` float32."""
        from speechssl._torchaudio import kaldi_mfcc_deltas

        if len(wave) < self.window:
            return np.zeros((0, self.dim), dtype=np.float32)
        with torch.inference_mode():
            feats = kaldi_mfcc_deltas(torch.from_numpy(wave), self.sample_rate).numpy()
        if self.cmvn:
            feats = (feats - feats.mean(axis=0)) / (feats.std(axis=0) + 1e-5)
        return feats.astype(np.float32, copy=False)

    def compute(self, item: np.ndarray) -> np.ndarray:
        return item

    def extract_file(self, path: str | Path, expected_sample_rate: int | None = None) -> np.ndarray:
        """MFCC of one mono audio file (its rate must be this extractor's)."""
        from speechssl.data.audio import read_audio

        wave, sr = read_audio(path)
        if sr != (expected_sample_rate or self.sample_rate) or wave.ndim != 1:
            raise ValueError(f"{path}: {sr} Hz, {1 if wave.ndim == 1 else wave.shape[1]} channel(s); "
                             f"expected mono at {self.sample_rate} Hz")
        return self.prepare(wave)
