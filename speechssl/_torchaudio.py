"""Every torchaudio call in speechssl goes through this module.

torchaudio 2.11 is its last release (maintenance mode); keeping the calls in one place means one file to
change if it has to be replaced. Audio file I/O never uses torchaudio (it needs torchcodec + FFmpeg):
see :mod:`speechssl.data.audio`, which uses soundfile.
"""

from __future__ import annotations

import torch


def resample(waveform: torch.Tensor, orig_sr: int, new_sr: int) -> torch.Tensor:
    """High-quality band-limited resampling (Kaiser-windowed sinc, as ``sox -v``-class quality).

    waveform: (..., time) float tensor. Returns (..., time * new_sr / orig_sr).
    """
    if orig_sr == new_sr:
        return waveform
    import torchaudio.functional as F

    return F.resample(
        waveform,
        orig_sr,
        new_sr,
        lowpass_filter_width=64,
        rolloff=0.9475937167399596,
        resampling_method="sinc_interp_kaiser",
        beta=14.769656459379492,
    )


def kaldi_mfcc_deltas(waveform: torch.Tensor, sample_rate: int) -> torch.Tensor:
    """HuBERT iteration-1 features: 13 Kaldi MFCCs + deltas + delta-deltas, as fairseq's
    ``examples/hubert/simple_kmeans/dump_mfcc_feature.py``.

    ``torchaudio.compliance.kaldi.mfcc`` with its defaults (25 ms Povey windows every 10 ms, snip_edges,
    23 mel bins, no dither) and ``use_energy=False``; deltas by ``torchaudio.functional.compute_deltas``
    (window 5) over time. waveform: ``(time,)`` float in [-1, 1], at least one 25 ms window long.
    Returns ``(frames, 39)`` with ``frames = 1 + (time - 0.025 sr) // (0.010 sr)``.
    """
    import torchaudio.compliance.kaldi as kaldi
    import torchaudio.functional as F

    mfcc = kaldi.mfcc(waveform.view(1, -1), sample_frequency=sample_rate, use_energy=False).T  # (13, frames)
    deltas = F.compute_deltas(mfcc)
    ddeltas = F.compute_deltas(deltas)
    return torch.cat([mfcc, deltas, ddeltas], dim=0).T.contiguous()
