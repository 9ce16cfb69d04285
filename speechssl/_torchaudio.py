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


def kaldi_mel_banks(num_mel_bins: int, n_fft: int, sample_rate: int, low_freq: float = 20.0) -> torch.Tensor:
    """Kaldi's triangular mel filters (``torchaudio.compliance.kaldi.fbank``'s), ``(num_mel_bins, n_fft // 2 + 1)``
    fp32 over the bins of an ``n_fft``-point power spectrum (the Nyquist bin gets weight 0, as Kaldi),
    from ``low_freq`` to the Nyquist frequency."""
    import torchaudio.compliance.kaldi as kaldi

    banks, _ = kaldi.get_mel_banks(num_mel_bins, n_fft, float(sample_rate), low_freq, 0.0, 100.0, -500.0, 1.0)
    return torch.nn.functional.pad(banks.float(), (0, 1), value=0.0)


class DecoderUnavailable(ImportError):
    """torchaudio's CTC beam-search decoder needs the optional ``flashlight-text`` package."""


def ctc_beam_decoder(tokens: list[str], *, lexicon: str | None = None, lm: str | None = None, nbest: int = 1,
                     beam_size: int = 50, beam_size_token: int | None = None, beam_threshold: float = 50.0,
                     lm_weight: float = 2.0, word_score: float = 0.0, unk_score: float = float("-inf"),
                     sil_score: float = 0.0, blank_token: str = "<s>", sil_token: str = "|",
                     unk_word: str = "<unk>"):
    """torchaudio's flashlight CTC beam-search decoder (``torchaudio.models.decoder.ctc_decoder``).

    tokens: output symbols in model order; lexicon: optional ``word spelling...`` file (lexicon-constrained
    search); lm: optional KenLM model (ARPA or binary). Call the result on ``(B, L, V)`` fp32 CPU
    log-probabilities (and ``(B,)`` lengths): it returns, per utterance, a list of hypotheses with
    ``.tokens``, ``.words`` and ``.score``. Raises :class:`DecoderUnavailable` with the install command
    when ``flashlight-text`` is missing.
    """
    try:
        import flashlight.lib.text  # noqa: F401  (the dependency torchaudio's decoder wraps)
    except ImportError:
        raise DecoderUnavailable(
            "beam search with a lexicon / KenLM language model needs the flashlight-text package: "
            "pip install 'speechssl[decode]' (or pip install flashlight-text); or decode with --decoder greedy "
            "or --decoder beam (speechssl's own prefix beam search, no language model)") from None
    from torchaudio.models.decoder import ctc_decoder

    return ctc_decoder(
        lexicon=lexicon, tokens=tokens, lm=lm, nbest=nbest, beam_size=beam_size, beam_size_token=beam_size_token,
        beam_threshold=beam_threshold, lm_weight=lm_weight, word_score=word_score, unk_score=unk_score,
        sil_score=sil_score, log_add=False, blank_token=blank_token, sil_token=sil_token, unk_word=unk_word)
