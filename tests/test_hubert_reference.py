"""speechssl's HuBERT against torchaudio's HuBERTPretrainModel and transformers' HubertModel.

Same random weights (converted with :mod:`speechssl.models.weights`), eval mode, fp32:

* torchaudio ``hubert_pretrain_model`` (tiny config): masked and unmasked logits for the same mask and
  labels, and the feature penalty. torchaudio returns ``(frames, 1 + K)`` logits with the positive first
  and the target's own column at -inf; speechssl returns class logits ``(frames, K)``: the test maps one
  onto the other. torchaudio draws its mask inside the model, so its mask generator is replaced by one
  applying the same given mask.
* transformers ``HubertModel``: every layer's output and the final output, with and without a given mask
  (``mask_time_indices``), on a padded batch (attention mask passed explicitly).

The reference model's norm affines and biases are perturbed before conversion (:func:`perturb_affines`).
Frame padding: torchaudio and transformers mark the frames past the conv output length of the valid
samples (``model.frame_padding: conv_length``, set in the comparisons on padded batches); fairseq's
HuBERT, speechssl's default, marks a frame padded only when all of its samples are (``all_samples``),
checked against fairseq's rule written out here and against torchaudio fed with those frame lengths.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from speechssl.models import HubertModel, hubert_tiny_config
from speechssl.models.masking import compute_mask_indices
from speechssl.models.ctc import Wav2VecCtc
from speechssl.models.speaker import upstream_hidden_states
from speechssl.models.weights import (
    convert_reference_state_dict,
    hubert_config_from_transformers,
    hubert_transformers_config_kwargs,
    torchaudio_hubert_pretrain_kwargs,
)

from wav2vec2_fixtures import perturb_affines

pytestmark = pytest.mark.usefixtures("one_thread")

torchaudio = pytest.importorskip("torchaudio")
transformers = pytest.importorskip("transformers")

TOL = 1e-4
STYLES = {
    "base": {},
    "large": dict(extractor_mode="layer_norm", conv_bias=True, layer_norm_first=True),
}


def make_config(style: str, **overrides):
    return dataclasses.replace(hubert_tiny_config(num_classes=[12], label_rate=50.0), **STYLES[style], **overrides)


class _GivenMask(torch.nn.Module):
    """Replaces torchaudio's MaskGenerator: applies ``mask`` with the model's own mask embedding."""

    def __init__(self, embedding, mask):
        super().__init__()
        self.mask_embedding, self.mask = embedding, mask

    def forward(self, x, padding_mask):
        x = x.clone()
        x[self.mask] = self.mask_embedding.to(x.dtype)
        return x, self.mask


def torchaudio_pair(cfg):
    from torchaudio.models.wav2vec2.model import hubert_pretrain_model

    torch.manual_seed(0)
    ta = perturb_affines(hubert_pretrain_model(**torchaudio_hubert_pretrain_kwargs(cfg))).eval()
    ours = HubertModel(cfg).eval()
    missing, unexpected = ours.load_state_dict(convert_reference_state_dict(ta.state_dict()), strict=True)
    return ta, ours


def assert_logits_match(theirs_m, theirs_u, out, labels, masked, unmasked) -> float:
    """torchaudio's ``(frames, 1 + K)`` logits (positive first, the target's own column -inf) against
    speechssl's class logits ``(frames, K)`` at the ``masked`` / ``unmasked`` frames; returns the max diff."""
    worst = 0.0
    for theirs, mine, target, sel in ((theirs_m, out["logit_m_list"][0], out["target_m_list"][0], masked),
                                      (theirs_u, out["logit_u_list"][0], out["target_u_list"][0], unmasked)):
        assert torch.equal(target, labels[sel])
        assert mine.shape == (int(sel.sum()), 12) and theirs.shape == (int(sel.sum()), 13)
        positive = mine.gather(1, target[:, None])
        others = mine.scatter(1, target[:, None], float("-inf"))
        assert torch.equal(torch.isinf(theirs[:, 1:]), torch.isinf(others))
        finite = torch.isfinite(others)
        worst = max(worst, (theirs[:, :1] - positive).abs().max().item(),
                    (theirs[:, 1:][finite] - others[finite]).abs().max().item())
    assert worst < TOL
    return worst


@pytest.mark.parametrize("style", sorted(STYLES))
def test_logits_match_torchaudio(style):
    cfg = make_config(style)
    ta, ours = torchaudio_pair(cfg)
    g = torch.Generator().manual_seed(1)
    source = torch.randn(2, 8000, generator=g)
    L = int(ours.feature_extractor.output_lengths(torch.tensor(8000)))
    labels = torch.randint(0, 12, (2, L), generator=g)
    mask = compute_mask_indices((2, L), None, 0.5, 3, min_masks=2, generator=torch.Generator().manual_seed(2))
    ta.mask_generator = _GivenMask(ta.mask_generator.mask_embedding, mask)
    with torch.no_grad():
        logit_m, logit_u, pen = ta(source, labels)
        out = ours(source, target_list=[labels], mask_indices=mask)
    assert_logits_match(logit_m, logit_u, out, labels, mask, ~mask)
    assert abs(pen.item() - out["features_pen"].item()) < 1e-5


def padded_hubert_batch(lengths=(9000, 6400, 4000), seed: int = 5):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(lengths)
    padding = torch.arange(int(lengths.max()))[None] >= lengths[:, None]
    source = torch.randn(len(lengths), int(lengths.max()), generator=g).masked_fill(padding, 0.0)
    return source, padding, lengths


def torchaudio_hubert_forward(ta, source, labels, frame_lengths):
    """torchaudio's ``HuBERTPretrainModel.forward`` with the valid frame counts given instead of derived
    from the sample lengths by the conv formula (its own steps, in its order)."""
    x, _ = ta.wav2vec2.feature_extractor(source, None)
    pen = x.float().pow(2).mean()
    pad = torch.arange(x.shape[1])[None] >= frame_lengths[:, None]
    x, attention_mask = ta.wav2vec2.encoder._preprocess(x, frame_lengths)
    x, mask = ta.mask_generator(x, pad)
    x = ta.wav2vec2.encoder.transformer(x, attention_mask=attention_mask)
    mask_m = ~pad & mask
    logit_m, logit_u = ta.logit_generator(x, labels, mask_m, ~pad & ~mask_m)
    return logit_m, logit_u, pen


@pytest.mark.parametrize("style", sorted(STYLES))
def test_logits_match_torchaudio_on_a_padded_batch(style):
    """Different lengths, padded: with torchaudio's frame rule (conv_length) the logits at the valid frames
    are torchaudio's (padded frames are neither attended to, masked nor predicted)."""
    cfg = make_config(style, frame_padding="conv_length")
    ta, ours = torchaudio_pair(cfg)
    source, padding, lengths = padded_hubert_batch()
    L = int(ours.feature_extractor.output_lengths(torch.tensor(source.shape[1])))
    valid = torch.arange(L)[None] < ours.feature_extractor.output_lengths(lengths)[:, None]
    labels = torch.randint(0, 12, (3, L), generator=torch.Generator().manual_seed(6))
    mask = compute_mask_indices((3, L), ~valid, 0.5, 3, min_masks=2, generator=torch.Generator().manual_seed(7))
    ta.mask_generator = _GivenMask(ta.mask_generator.mask_embedding, mask)
    with torch.no_grad():
        logit_m, logit_u, pen = ta(source, labels, lengths)
        out = ours(source, padding, target_list=[labels], mask_indices=mask)
    assert torch.equal(out["padding_mask"], ~valid)
    assert_logits_match(logit_m, logit_u, out, labels, mask & valid, ~mask & valid)
    assert abs(pen.item() - out["features_pen"].item()) < 1e-5


def fairseq_forward_padding_mask(padding_mask, num_frames):
    """fairseq's ``HubertModel.forward_padding_mask``, transcribed."""
    extra = padding_mask.size(1) % num_frames
    if extra > 0:
        padding_mask = padding_mask[:, :-extra]
    padding_mask = padding_mask.view(padding_mask.size(0), num_frames, -1)
    return padding_mask.all(-1)


def test_frame_padding_is_fairseqs_hubert_rule():
    """A frame is padding only when all of its samples are (fairseq), not past the conv output length of the
    valid samples (wav2vec 2.0, torchaudio, transformers): BASE's front-end (the tiny config has the same
    kernels and strides), 16,000 valid of 32,000 samples -> 50 valid frames, the conv rule gives 49."""
    model = HubertModel(make_config("base")).eval()
    lengths = torch.tensor([32000, 16000, 12345, 4000, 401])
    padding = torch.arange(32000)[None] >= lengths[:, None]
    L = int(model.feature_extractor.output_lengths(torch.tensor(32000)))
    mine = model.frame_padding_mask(padding, L)
    assert torch.equal(mine, fairseq_forward_padding_mask(padding, L))
    assert (~mine).sum(1).tolist() == [99, 50, 39, 13, 2]
    assert model.cfg.frame_padding == "auto"
    assert model.feature_extractor.output_lengths(lengths).tolist() == [99, 49, 38, 12, 1]
    # the label-trimmed frame count (forward_targets) is the one the rule runs on, as in fairseq
    assert torch.equal(model.frame_padding_mask(padding, 60), fairseq_forward_padding_mask(padding, 60))
    conv_rule = HubertModel(make_config("base", frame_padding="conv_length")).frame_padding_mask(padding, L)
    assert (~conv_rule).sum(1).tolist() == [99, 49, 38, 12, 1]
    with pytest.raises(ValueError, match="model.frame_padding must be one of"):
        HubertModel(make_config("base", frame_padding="ceil"))


@pytest.mark.parametrize("style", sorted(STYLES))
def test_fairseq_frame_padding_enters_attention_masking_and_logits(style):
    """With fairseq's rule the extra valid frame is attended to, can be masked and is predicted: the logits
    equal torchaudio's computation fed with fairseq's frame lengths."""
    cfg = make_config(style)
    ta, ours = torchaudio_pair(cfg)
    source, padding, lengths = padded_hubert_batch()
    L = int(ours.feature_extractor.output_lengths(torch.tensor(source.shape[1])))
    fs_pad = fairseq_forward_padding_mask(padding, L)
    frame_lengths = (~fs_pad).sum(1)
    assert (frame_lengths > ours.feature_extractor.output_lengths(lengths)).any()  # the rules differ here
    labels = torch.randint(0, 12, (3, L), generator=torch.Generator().manual_seed(6))
    mask = compute_mask_indices((3, L), fs_pad, 0.5, 3, min_masks=2, generator=torch.Generator().manual_seed(7))
    ta.mask_generator = _GivenMask(ta.mask_generator.mask_embedding, mask)
    with torch.no_grad():
        logit_m, logit_u, pen = torchaudio_hubert_forward(ta, source, labels, frame_lengths)
        out = ours(source, padding, target_list=[labels], mask_indices=mask)
    assert torch.equal(out["padding_mask"], fs_pad)
    assert_logits_match(logit_m, logit_u, out, labels, mask & ~fs_pad, ~mask & ~fs_pad)
    assert abs(pen.item() - out["features_pen"].item()) < 1e-5


def test_ctc_lengths_and_speaker_pooling_of_a_hubert_upstream_use_fairseqs_frames():
    """Consequences of the rule: CTC input lengths of a HuBERT upstream are fairseq's (HubertEncoder uses the
    same mask), and speaker ID pools over the same frames."""
    cfg = dataclasses.replace(make_config("base"), num_classes=[])
    upstream = HubertModel(cfg)
    source, padding, lengths = padded_hubert_batch()
    L = int(upstream.feature_extractor.output_lengths(torch.tensor(source.shape[1])))
    expected = (~fairseq_forward_padding_mask(padding, L)).sum(1)
    ctc = Wav2VecCtc(upstream, cfg, vocab_size=10).eval()
    with torch.no_grad():
        assert torch.equal(ctc(source, padding)["lengths"], expected)
        _, frame_pad = upstream_hidden_states(upstream.eval(), source, padding)
    assert torch.equal((~frame_pad).sum(1), expected)


def test_feature_alignment_of_100hz_labels():
    """Labels at 100 Hz on 50 Hz frames: frame t takes label 2t; frames beyond the labels are cut."""
    cfg = make_config("base", label_rate=100.0)
    model = HubertModel(cfg).eval()
    L = int(model.feature_extractor.output_lengths(torch.tensor(8000)))  # 24 frames
    labels = torch.arange(2 * L - 3).remainder(12).expand(2, -1)  # 45 labels cover 22 frames
    with torch.no_grad():
        out = model(torch.randn(2, 8000), target_list=[labels], mask=False)
    assert out["x"].shape[1] == int((2 * L - 3) / 2)
    assert torch.equal(out["target_u_list"][0], labels[:, 0 : 2 * out["x"].shape[1] : 2].reshape(-1))


@pytest.mark.parametrize("style", sorted(STYLES))
def test_encoder_matches_transformers(style):
    cfg = make_config(style, frame_padding="conv_length")  # transformers' frame padding rule
    torch.manual_seed(0)
    hf = transformers.HubertModel(transformers.HubertConfig(**hubert_transformers_config_kwargs(cfg)))
    hf = perturb_affines(hf).eval()
    rebuilt = hubert_config_from_transformers(hf.config, num_classes=[12], label_rate=50.0)
    assert rebuilt.conv_feature_layers == cfg.conv_feature_layers
    assert (rebuilt.layer_norm_first, rebuilt.extractor_mode) == (cfg.layer_norm_first, cfg.extractor_mode)
    assert rebuilt.frame_padding == "conv_length"
    ours = HubertModel(cfg).eval()
    sd = convert_reference_state_dict(hf.state_dict())
    missing, unexpected = ours.load_state_dict(sd, strict=False)
    assert sorted(missing) == ["final_proj.bias", "final_proj.weight", "label_embs_concat"] and not unexpected

    g = torch.Generator().manual_seed(3)
    lengths = torch.tensor([9000, 7000])
    padding = torch.arange(9000)[None] >= lengths[:, None]
    source = torch.randn(2, 9000, generator=g).masked_fill(padding, 0.0)
    L = int(ours.feature_extractor.output_lengths(torch.tensor(9000)))
    valid = torch.arange(L)[None] < ours.feature_extractor.output_lengths(lengths)[:, None]
    mask = compute_mask_indices((2, L), ~valid, 0.4, 3, min_masks=2, generator=torch.Generator().manual_seed(4))
    for given in (None, mask):
        with torch.no_grad():
            theirs = hf(source, attention_mask=(~padding).long(), mask_time_indices=given,
                        output_hidden_states=True)
            mine = ours(source, padding_mask=padding, mask=given is not None, mask_indices=given,
                        features_only=True)
        assert torch.equal(mine["padding_mask"], ~valid)
        assert (theirs.last_hidden_state - mine["x"]).abs()[valid].max().item() < TOL
        # hidden_states[i + 1] is layer i's output (pre-LN: the last one after the final LayerNorm)
        for i, layer_out in enumerate(mine["layer_results"][:-1]):
            assert (theirs.hidden_states[i + 1] - layer_out).abs()[valid].max().item() < TOL
