"""speechssl's wav2vec 2.0 against two independent implementations, with the same random weights.

* torchaudio ``wav2vec2_model`` (encoder only): conv features, every layer, final output.
* transformers ``Wav2Vec2ForPreTraining``: conv features, every layer, quantized targets, context
  projections, contrastive logits and loss for the same mask and the same distractors, perplexities.

The reference model's norm affines and biases are perturbed before its weights are converted
(:func:`wav2vec2_fixtures.perturb_affines`), so that none of them is at its identity / zero init.
Both a BASE-style config (group-norm extractor, no conv bias, post-LN) and a LARGE-style one
(layer-norm extractor, conv bias, pre-LN) run on a padded batch of unequal lengths, eval mode, fp32.

Padding: all three implementations run the conv extractor over the zero-padded batch as given (BASE's
GroupNorm therefore sees the padding, in fairseq too), zero padded frames before the positional
convolution and exclude them as attention keys. transformers does this only when it receives an
``attention_mask``; its feature extractor for group-norm checkpoints defaults to
``return_attention_mask=False`` (plain zero padding, every frame attended), so we pass the mask
explicitly. Values at padded frames are not meaningful and are compared only where all agree by design
(the comparisons below happen to be exact everywhere, but only valid frames are asserted).
transformers has no feature penalty; it is checked separately in test_wav2vec2_objective.py.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from speechssl.models import Wav2Vec2Model, wav2vec2_tiny_config
from speechssl.models.masking import compute_mask_indices
from speechssl.models.weights import (
    config_from_transformers,
    convert_reference_state_dict,
    torchaudio_model_kwargs,
    transformers_config_kwargs,
)
from speechssl.objectives import Wav2Vec2Criterion, contrastive_logits, sample_negatives

from wav2vec2_fixtures import perturb_affines, single_thread  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("single_thread")

transformers = pytest.importorskip("transformers")
torchaudio = pytest.importorskip("torchaudio")

TOL = 1e-4
STYLES = {
    "base": {},
    "large": dict(extractor_mode="layer_norm", conv_bias=True, layer_norm_first=True),
}


def make_config(style: str, **overrides):
    # a small codebook (4 x 2 groups) so that identical distractors (neg_is_pos) actually occur
    return dataclasses.replace(wav2vec2_tiny_config(), latent_vars=4, **STYLES[style], **overrides)


def padded_batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([16000, 12000, 9000])
    T = int(lengths.max())
    padding_mask = torch.arange(T)[None, :] >= lengths[:, None]
    source = torch.randn(len(lengths), T, generator=g).masked_fill(padding_mask, 0.0)
    return source, padding_mask, lengths


def build_pair_transformers(cfg):
    torch.manual_seed(0)
    hf = transformers.Wav2Vec2ForPreTraining(transformers.Wav2Vec2Config(**transformers_config_kwargs(cfg)))
    perturb_affines(hf)  # so that a norm or bias mapped wrongly shows
    ours = Wav2Vec2Model(cfg)
    ours.load_state_dict(convert_reference_state_dict(hf.state_dict()), strict=True)
    return hf.eval(), ours.eval()


def max_diff(a, b, where=None):
    d = (a - b).abs()
    return (d[where] if where is not None else d).max().item()


@pytest.mark.parametrize("style", sorted(STYLES))
def test_matches_torchaudio_encoder(style):
    cfg = make_config(style)
    torch.manual_seed(0)
    ta = perturb_affines(torchaudio.models.wav2vec2_model(**torchaudio_model_kwargs(cfg))).eval()
    ours = Wav2Vec2Model(cfg).eval()
    missing, unexpected = ours.load_state_dict(convert_reference_state_dict(ta.state_dict()), strict=False)
    assert not unexpected
    assert set(missing) == {"mask_emb", "quantizer.vars", "quantizer.weight_proj.weight",
                            "quantizer.weight_proj.bias", "project_q.weight", "project_q.bias",
                            "final_proj.weight", "final_proj.bias"}
    source, padding_mask, lengths = padded_batch()
    with torch.no_grad():
        out = ours(source, padding_mask, mask=False, features_only=True)
        conv, frame_lengths = ta.feature_extractor(source, lengths)
        layers, _ = ta.extract_features(source, lengths)
        final, _ = ta(source, lengths)
    valid = ~out["padding_mask"]
    assert torch.equal(valid.sum(1), frame_lengths)
    assert max_diff(out["conv_features"], conv) < TOL
    assert len(out["layer_results"]) == len(layers) == cfg.encoder_layers
    for ours_layer, ta_layer in zip(out["layer_results"], layers):
        assert max_diff(ours_layer, ta_layer, valid) < TOL
    assert max_diff(out["x"], final, valid) < TOL


def transformers_logits(hf_out, mask, negatives, temp):
    """transformers' own contrastive-logit computation for our (B, M, K) distractors, as (B, M, 1 + K)."""
    B, L = mask.shape
    M, K = negatives.shape[1], negatives.shape[2]
    positions = mask.nonzero()[:, 1].view(B, M)  # frame index of each masked target
    flat = positions.gather(1, negatives.view(B, -1)).view(B, M, K) + torch.arange(B)[:, None, None] * L
    sampled = torch.zeros(B, L, K, dtype=torch.long)
    sampled[mask] = flat.view(B * M, K)
    q = hf_out.projected_quantized_states
    F = q.shape[-1]
    negs = q.reshape(-1, F)[sampled.view(-1)].view(B, L, K, F).permute(2, 0, 1, 3)
    logits = transformers.Wav2Vec2ForPreTraining.compute_contrastive_logits(q[None], negs, hf_out.projected_states,
                                                                          temp)
    neg_is_pos = (q == negs).all(-1)
    logits[1:][neg_is_pos] = float("-inf")
    return logits.permute(1, 2, 0)[mask].view(B, M, K + 1), sampled


@pytest.mark.parametrize("style", sorted(STYLES))
def test_matches_transformers_pretraining(style):
    cfg = make_config(style)
    hf, ours = build_pair_transformers(cfg)
    source, padding_mask, _ = padded_batch(1)
    attention_mask = (~padding_mask).long()
    with torch.no_grad():
        num_frames = int(ours.feature_extractor.output_lengths(torch.tensor(source.shape[1])))
        frame_pad = ours.frame_padding_mask(padding_mask, num_frames)
        mask = compute_mask_indices((3, num_frames), frame_pad, cfg.mask_prob, cfg.mask_length, min_masks=2,
                                    generator=torch.Generator().manual_seed(3))
        M = int(mask[0].sum())
        negatives = sample_negatives(3, M, cfg.num_negatives, generator=torch.Generator().manual_seed(4))

        out = ours(source, padding_mask, mask_indices=mask)
        hf_conv = hf.wav2vec2.feature_extractor(source).transpose(1, 2)
        hf_out = hf(source, attention_mask=attention_mask, mask_time_indices=mask, output_hidden_states=True)
        hf_logits, sampled = transformers_logits(hf_out, mask, negatives, cfg.logit_temp)
        hf_loss = hf(source, attention_mask=attention_mask, mask_time_indices=mask,
                     sampled_negative_indices=sampled)

    valid = ~out["padding_mask"]
    assert max_diff(out["conv_features"], hf_conv) < TOL
    # transformers' hidden_states = (input to layer 1, output of layer 1, ..., output of the last layer)
    assert len(hf_out.hidden_states) == cfg.encoder_layers + 1
    for ours_layer, hf_layer in zip(out["layer_results"], hf_out.hidden_states[1:]):
        assert max_diff(ours_layer, hf_layer, valid) < TOL
    assert max_diff(out["targets"], hf_out.projected_quantized_states[mask].view(3, M, -1)) < TOL
    assert max_diff(out["pred"], hf_out.projected_states[mask].view(3, M, -1)) < TOL
    # eval mode: transformers reports the perplexity of the hard codes on the masked frames
    assert out["code_perplexity"].item() == pytest.approx(hf_out.codevector_perplexity.item(), rel=1e-5)

    logits = contrastive_logits(out["pred"], out["targets"], negatives, cfg.logit_temp, out["codes"])
    assert logits.dtype == torch.float32 and logits.shape == (3, M, cfg.num_negatives + 1)
    inf = torch.isinf(logits)
    assert torch.equal(inf, torch.isinf(hf_logits))
    assert inf.any(), "the small codebook should produce identical distractors"
    assert max_diff(logits, hf_logits, ~inf) < TOL

    loss = Wav2Vec2Criterion(cfg.num_negatives, cfg.logit_temp, 0.0, 0.0).compute(out, negatives)
    assert loss.sample_size == 3 * M
    assert loss.loss.item() == pytest.approx(hf_loss.contrastive_loss.item(), rel=1e-5)


@pytest.mark.parametrize("style", sorted(STYLES))
def test_train_mode_prob_perplexity_matches_transformers(style):
    """In training, both report the perplexity of the batch-averaged softmax over the masked frames
    (fairseq adds 1e-7 inside the log, transformers uses xlogy: relative difference < 1e-4)."""
    cfg = make_config(style, dropout=0.0, attention_dropout=0.0, dropout_input=0.0, dropout_features=0.0)
    hf, ours = build_pair_transformers(cfg)
    hf.train()
    ours.train()
    source, padding_mask, _ = padded_batch(2)
    with torch.no_grad():
        num_frames = int(ours.feature_extractor.output_lengths(torch.tensor(source.shape[1])))
        mask = compute_mask_indices((3, num_frames), ours.frame_padding_mask(padding_mask, num_frames),
                                    cfg.mask_prob, cfg.mask_length, min_masks=2)
        out = ours(source, padding_mask, mask_indices=mask)
        hf_out = hf(source, attention_mask=(~padding_mask).long(), mask_time_indices=mask)
    assert out["prob_perplexity"].item() == pytest.approx(hf_out.codevector_perplexity.item(), rel=1e-4)


def test_padding_mask_changes_valid_frames():
    """Sanity check that the comparisons above exercise padding: attending to padded frames changes
    the valid frames' outputs."""
    ours = Wav2Vec2Model(make_config("base")).eval()
    source, padding_mask, _ = padded_batch()
    with torch.no_grad():
        masked = ours(source, padding_mask, mask=False, features_only=True)
        unmasked = ours(source, None, mask=False, features_only=True)
    valid = ~masked["padding_mask"]
    assert max_diff(masked["x"], unmasked["x"], valid) > 1e-3


def test_config_round_trip_through_transformers():
    for style in STYLES:
        cfg = make_config(style)
        cfg = dataclasses.replace(cfg, feature_grad_mult=1.0, latent_dim=cfg.final_dim)  # explicit, as transformers
        back = config_from_transformers(transformers.Wav2Vec2Config(**transformers_config_kwargs(cfg)))
        assert back == cfg


def test_unmapped_keys_are_reported():
    with pytest.raises(ValueError, match="no speechssl counterpart"):
        convert_reference_state_dict({"aux.weight": torch.zeros(1)})
    assert convert_reference_state_dict({"aux.weight": torch.zeros(1)}, strict=False) == {}
    with pytest.raises(ValueError, match="needs q, k and v"):
        convert_reference_state_dict({"encoder.transformer.layers.0.attention.q_proj.weight": torch.zeros(1)})
