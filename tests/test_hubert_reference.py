"""speechssl's HuBERT against torchaudio's HuBERTPretrainModel and transformers' HubertModel.

Same random weights (converted with :mod:`speechssl.models.weights`), eval mode, fp32:

* torchaudio ``hubert_pretrain_model`` (tiny config): masked and unmasked logits for the same mask and
  labels, and the feature penalty. torchaudio returns ``(frames, 1 + K)`` logits with the positive first
  and the target's own column at -inf; speechssl returns class logits ``(frames, K)``: the test maps one
  onto the other. torchaudio draws its mask inside the model, so its mask generator is replaced by one
  applying the same given mask.
* transformers ``HubertModel``: every layer's output and the final output, with and without a given mask
  (``mask_time_indices``), on a padded batch (attention mask passed explicitly).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from speechssl.models import HubertModel, hubert_tiny_config
from speechssl.models.masking import compute_mask_indices
from speechssl.models.weights import (
    convert_reference_state_dict,
    hubert_config_from_transformers,
    hubert_transformers_config_kwargs,
    torchaudio_hubert_pretrain_kwargs,
)

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
    ta = hubert_pretrain_model(**torchaudio_hubert_pretrain_kwargs(cfg)).eval()
    ours = HubertModel(cfg).eval()
    missing, unexpected = ours.load_state_dict(convert_reference_state_dict(ta.state_dict()), strict=True)
    return ta, ours


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
    for theirs, mine, target, sel in ((logit_m, out["logit_m_list"][0], out["target_m_list"][0], mask),
                                      (logit_u, out["logit_u_list"][0], out["target_u_list"][0], ~mask)):
        assert torch.equal(target, labels[sel])
        assert mine.shape == (int(sel.sum()), 12) and theirs.shape == (int(sel.sum()), 13)
        positive = mine.gather(1, target[:, None])
        assert (theirs[:, :1] - positive).abs().max().item() < TOL
        others = mine.scatter(1, target[:, None], float("-inf"))
        assert torch.equal(torch.isinf(theirs[:, 1:]), torch.isinf(others))
        finite = torch.isfinite(others)
        assert (theirs[:, 1:][finite] - others[finite]).abs().max().item() < TOL
    assert abs(pen.item() - out["features_pen"].item()) < 1e-5


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
    cfg = make_config(style)
    torch.manual_seed(0)
    hf = transformers.HubertModel(transformers.HubertConfig(**hubert_transformers_config_kwargs(cfg))).eval()
    rebuilt = hubert_config_from_transformers(hf.config, num_classes=[12], label_rate=50.0)
    assert rebuilt.conv_feature_layers == cfg.conv_feature_layers
    assert (rebuilt.layer_norm_first, rebuilt.extractor_mode) == (cfg.layer_norm_first, cfg.extractor_mode)
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
