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
