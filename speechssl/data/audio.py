"""Audio file I/O through soundfile (libsndfile): the only place speechssl reads or writes audio."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf


def read_audio(path: str | Path, dtype: str = "float32", frames: int = -1, start: int = 0) -> tuple[np.ndarray, int]:
    """Read ``frames`` samples from ``start`` (all by default). Returns (samples, sample_rate);
    samples is (time,) for mono files and (time, channels) otherwise."""
    data, sr = sf.read(str(path), dtype=dtype, frames=frames, start=start, always_2d=False)
    return data, sr


def audio_info(path: str | Path) -> sf._SoundFileInfo:
    """Header-only information (frames, samplerate, channels, format) without decoding samples."""
    return sf.info(str(path))


def write_audio(path: str | Path, samples: np.ndarray, sample_rate: int, subtype: str | None = None) -> None:
    """Write samples (time,) or (time, channels); the format follows the extension (.flac, .wav...)."""
    sf.write(str(path), samples, sample_rate, subtype=subtype)
