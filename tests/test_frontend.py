"""The log-mel front-end (model.extractor_mode: fbank): Kaldi's filterbanks batched, frame counts, and
wav2vec 2.0 / HuBERT models built on it."""

import dataclasses

import pytest
import torch

from speechssl.models import build_model, hubert_tiny_config, wav2vec2_tiny_config
from speechssl.models.frontend import FbankFeatureExtractor


def test_log_mel_equals_kaldi_fbank_for_every_utterance_of_a_batch():
    import torchaudio.compliance.kaldi as kaldi

    torch.manual_seed(0)
    x = torch.randn(3, 9000) * 0.1
    ours = FbankFeatureExtractor(80, 1).log_mel(x)
    for b in range(3):
        ref = kaldi.fbank(x[b:b + 1], num_mel_bins=80, dither=0.0)
        assert ours[b].shape == ref.shape
        torch.testing.assert_close(ours[b], ref, atol=2e-3, rtol=1e-4)


def test_stacked_frames_and_output_lengths():
    fe = FbankFeatureExtractor(80, 2)
    x = torch.randn(2, 16000)
    y = fe(x)
    frames = fe.log_mel(x)  # (B, 98, 80) at 10 ms
    assert y.shape == (2, 49, 160) and fe.stride == 320 and fe.out_channels == 160
    torch.testing.assert_close(y[:, 3, :80], frames[:, 6]) and torch.testing.assert_close(y[:, 3, 80:], frames[:, 7])
    lengths = torch.tensor([16000, 400, 559, 560, 0])
    assert fe.output_lengths(lengths).tolist() == [49, 0, 0, 1, 0]
    assert [fe.num_frames(n) for n in lengths.tolist()] == [49, 0, 0, 1, 0]
    with pytest.raises(ValueError, match="shorter than the log-mel front-end"):
        fe(torch.randn(1, 500))
    assert list(fe.parameters()) == [] and fe.state_dict() == {}


@pytest.mark.parametrize("make", [wav2vec2_tiny_config, hubert_tiny_config])
def test_models_on_the_log_mel_front_end_train_everything_but_the_front_end(make):
    cfg = dataclasses.replace(make(), extractor_mode="fbank", num_classes=[7] if make is hubert_tiny_config else [],
                              label_rate=50.0)
    model = build_model(cfg).train()
    x = torch.randn(2, 16000)
    pad = torch.zeros(2, 16000, dtype=torch.bool)
    pad[1, 9000:] = True
    if cfg.name == "hubert":
        out = model(x, pad, target_list=[torch.randint(0, 7, (2, 49))])
        loss = out["logit_m_list"][0].logsumexp(-1).sum()
    else:
        out = model(x, pad)
        loss = out["pred"].sum() + out["targets"].sum()
    assert out["conv_features"].shape == (2, 49, 160)
    assert float(out["features_pen"]) == 0.0  # nothing to penalize: the front-end has no parameters
    assert out["padding_mask"][1].sum() == 49 - model.feature_extractor.output_lengths(torch.tensor(9000))
    loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if n.startswith("encoder.layers"))


def test_standardized_log_mel_ignores_padding():
    """model.fbank_standardize: every bin of every utterance zero-mean unit-variance over its own valid
    frames; an utterance padded in a batch gets the same frames as alone."""
    torch.manual_seed(0)
    fe = FbankFeatureExtractor(80, 2, standardize=True)
    a, b = torch.randn(1, 16000) * 0.3, torch.randn(1, 9000) * 0.01
    alone = fe(a)[0].view(-1, 2, 80).reshape(-1, 80)
    torch.testing.assert_close(alone.mean(0), torch.zeros(80), atol=1e-4, rtol=0)
    torch.testing.assert_close(alone.std(0, correction=0), torch.ones(80), atol=1e-3, rtol=0)
    batch = torch.zeros(2, 16000)
    batch[0], batch[1, :9000] = a[0], b[0]
    out = fe(batch, torch.tensor([16000, 9000]))
    n = int(fe.output_lengths(torch.tensor(9000)))
    torch.testing.assert_close(out[1, :n], fe(b)[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out[0], fe(a)[0])
    assert not torch.allclose(fe(batch)[1, :n], fe(b)[0], atol=1e-2)  # without lengths the padding counts


def test_model_passes_the_valid_lengths_to_the_standardizing_front_end():
    cfg = dataclasses.replace(wav2vec2_tiny_config(), extractor_mode="fbank", fbank_standardize=True)
    model = build_model(cfg).eval()
    x = torch.randn(2, 16000) * 0.1
    pad = torch.zeros(2, 16000, dtype=torch.bool)
    pad[1, 9000:] = True
    n = int(model.feature_extractor.output_lengths(torch.tensor(9000)))
    both = model(x, pad, mask=False, features_only=True)["conv_features"]
    alone = model(x[1:, :9000], mask=False, features_only=True)["conv_features"]
    torch.testing.assert_close(both[1, :n], alone[0], atol=1e-4, rtol=1e-4)
