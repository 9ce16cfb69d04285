"""Front-ends: waveform -> frame features, chosen by ``model.extractor_mode``.

* ``default`` / ``group_norm`` / ``layer_norm``: wav2vec 2.0's learned convolution stack
  (:class:`~speechssl.models.components.ConvFeatureExtractor`), the published models' front-end;
* ``fbank``: :class:`FbankFeatureExtractor`, 80-d Kaldi log-mel filterbanks every 10 ms with
  ``model.fbank_stack`` consecutive frames stacked (2: 20 ms frames of 160 values, the rate of the
  conv stack), as fairseq2's w2v-BERT, MelHuBERT, Fast-HuBERT and BEST-RQ use; with
  ``model.fbank_standardize`` each utterance's bins are standardized (w2v-BERT's input: removes the
  microphone's spectral colouring and the level). It has no parameters:
  at small scale the learned waveform front-end costs most of the compute (about 80% of the tiny
  recipes' step) and has to be learned before anything above it can; the log-mel front-end starts from
  features that already separate speech sounds.

Both take ``(B, T)`` waveforms and return ``(B, L, C)`` channels-last frames; ``output_lengths`` maps
sample counts to frame counts and ``stride`` is the number of samples per frame (320 for both at the
published settings).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from speechssl.config import ModelConfig
from speechssl.models.components import ConvFeatureExtractor

FBANK_MODE = "fbank"


class FbankFeatureExtractor(nn.Module):
    """Kaldi-compatible log-mel filterbanks, batched, with ``stack`` frames concatenated.

    Per 25 ms window every 10 ms (``snip_edges``: only whole windows): remove the DC offset,
    pre-emphasis 0.97, Povey window, power spectrum of a 512-point FFT, ``num_mel_bins`` triangular mel
    filters (20 Hz .. Nyquist), natural log floored at float32 epsilon: the values of
    ``torchaudio.compliance.kaldi.fbank(x, num_mel_bins=80, dither=0)``, computed for a whole batch at once
    on any device. Then ``stack`` consecutive frames are concatenated (a trailing remainder is dropped).

    Input ``(B, T)`` float waveform; output ``(B, L, num_mel_bins * stack)`` fp32 with
    ``L = output_lengths(T)``. No parameters (the mel matrix and window are non-persistent buffers).
    """

    def __init__(self, num_mel_bins: int = 80, stack: int = 2, sample_rate: int = 16000, standardize: bool = False):
        super().__init__()
        self.standardize = standardize
        if num_mel_bins < 1 or stack < 1:
            raise ValueError(f"model.fbank_num_mel_bins ({num_mel_bins}) and model.fbank_stack ({stack}) must be >= 1")
        from speechssl._torchaudio import kaldi_mel_banks

        self.num_mel_bins, self.stack, self.sample_rate = num_mel_bins, stack, sample_rate
        self.window_size = int(sample_rate * 0.025)
        self.shift = int(sample_rate * 0.010)
        self.n_fft = 2 ** math.ceil(math.log2(self.window_size))
        n = torch.arange(self.window_size, dtype=torch.float64)
        povey = (0.5 - 0.5 * torch.cos(2 * math.pi * n / (self.window_size - 1))) ** 0.85
        self.register_buffer("window", povey.float(), persistent=False)
        self.register_buffer("mel_banks", kaldi_mel_banks(num_mel_bins, self.n_fft, sample_rate).T.contiguous(),
                             persistent=False)  # (n_fft // 2 + 1, num_mel_bins)
        self.out_channels = num_mel_bins * stack

    @property
    def stride(self) -> int:
        """Samples per output frame."""
        return self.shift * self.stack

    def log_mel(self, source: Tensor) -> Tensor:
        """``(B, T)`` -> ``(B, F, num_mel_bins)`` log-mel frames at 10 ms (before stacking), fp32."""
        with torch.autocast(device_type=source.device.type, enabled=False):
            frames = source.float().unfold(1, self.window_size, self.shift)  # (B, F, W) view
            frames = frames - frames.mean(dim=-1, keepdim=True)
            frames = torch.cat([frames[..., :1] * (1 - 0.97), frames[..., 1:] - 0.97 * frames[..., :-1]], dim=-1)
            spectrum = torch.fft.rfft(frames * self.window, n=self.n_fft).abs().pow(2)  # (B, F, n_fft/2 + 1)
            mel = spectrum @ self.mel_banks
            return mel.clamp(min=torch.finfo(torch.float32).eps).log()

    def forward(self, source: Tensor, lengths: Optional[Tensor] = None) -> Tensor:
        """``source (B, T)``; ``lengths (B,)`` valid samples per utterance (None: all), used by
        ``standardize`` so that padding never enters the statistics."""
        if source.dim() != 2:
            raise ValueError(f"expected a (batch, samples) waveform, got shape {tuple(source.shape)}")
        L = int(self.output_lengths(torch.tensor(source.shape[1])))
        if L < 1:
            raise ValueError(f"input of {source.shape[1]} samples is shorter than the log-mel front-end's "
                             f"{self.window_size + (self.stack - 1) * self.shift} samples; drop such inputs "
                             "(task.min_sample_size)")
        x = self.log_mel(source)[:, : L * self.stack]
        if self.standardize:
            x = self._standardize(x, lengths)
        return x.reshape(x.shape[0], L, self.out_channels)

    def _standardize(self, x: Tensor, lengths: Optional[Tensor]) -> Tensor:
        """Each mel bin of each utterance to zero mean and unit variance over its valid 10 ms frames
        (fairseq2's ``WaveformToFbankConverter(standardize=True)``, w2v-BERT's input). ``x (B, F, M)``."""
        if lengths is None:
            var, mean = torch.var_mean(x, dim=1, correction=0, keepdim=True)
        else:
            frames = (torch.div(lengths - self.window_size, self.shift, rounding_mode="floor") + 1).clamp(min=1)
            valid = torch.arange(x.shape[1], device=x.device)[None, :] < frames.to(x.device)[:, None]
            w = valid.unsqueeze(-1).to(x.dtype)
            n = w.sum(dim=1, keepdim=True).clamp(min=1.0)
            mean = (x * w).sum(dim=1, keepdim=True) / n
            var = ((x - mean).square() * w).sum(dim=1, keepdim=True) / n
        return (x - mean) * (var + 1e-5).rsqrt()

    def output_lengths(self, lengths: Tensor) -> Tensor:
        """Number of stacked frames for inputs of ``lengths`` samples (any integer tensor shape; >= 0)."""
        frames = torch.div(lengths - self.window_size, self.shift, rounding_mode="floor") + 1
        return torch.div(frames.clamp(min=0), self.stack, rounding_mode="floor")

    def num_frames(self, samples: int) -> int:
        """:meth:`output_lengths` of one host integer, in Python."""
        return max((samples - self.window_size) // self.shift + 1, 0) // self.stack

    def extra_repr(self) -> str:
        return f"num_mel_bins={self.num_mel_bins}, stack={self.stack}, stride={self.stride}"


def build_feature_extractor(cfg: ModelConfig) -> nn.Module:
    """The front-end named by ``cfg.extractor_mode`` (see the module docstring)."""
    if cfg.extractor_mode == FBANK_MODE:
        return FbankFeatureExtractor(cfg.fbank_num_mel_bins, cfg.fbank_stack, standardize=cfg.fbank_standardize)
    return ConvFeatureExtractor(cfg.conv_feature_layers, cfg.extractor_mode, cfg.conv_bias)
