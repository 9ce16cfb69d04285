"""HubertModel and the HuBERT objective: shapes, label sets, loss terms, gradients, learning."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from speechssl.config import CriterionConfig
from speechssl.models import HubertModel, Wav2Vec2Model, build_model, hubert_base_config, hubert_tiny_config
from speechssl.models import wav2vec2_tiny_config
from speechssl.models.masking import compute_mask_indices
from speechssl.objectives import HubertCriterion, build_objective

pytestmark = pytest.mark.usefixtures("one_thread")


def batch(B=2, T=8000, K=8, rate=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    source = torch.randn(B, T, generator=g)
    labels = torch.randint(0, K, (B, T * rate // 16000), generator=g)
    return source, labels


def test_published_configs():
    base = hubert_base_config([100], 100.0)
    assert (base.name, base.mask_prob, base.final_dim, base.untie_final_proj, base.feature_grad_mult) == \
        ("hubert", 0.80, 256, True, 0.1)
    n = sum(p.numel() for p in HubertModel(base).parameters())
    assert 94e6 < n < 96e6  # ~95M as fairseq's HuBERT BASE
    assert isinstance(build_model(base), HubertModel)


def test_features_only_keys_match_wav2vec2():
    cfg = hubert_tiny_config()
    source, _ = batch()
    mine = HubertModel(cfg).eval()(source, mask=False, features_only=True)
    theirs = Wav2Vec2Model(wav2vec2_tiny_config()).eval()(source, mask=False, features_only=True)
    assert set(mine) == set(theirs)
    assert mine["x"].shape == theirs["x"].shape and len(mine["layer_results"]) == 2
    # features-only works without label embeddings (e.g. after remove_pretraining_modules)
    cfg_nolabels = dataclasses.replace(cfg, num_classes=[], label_rate=-1.0)
    model = HubertModel(cfg_nolabels)
    assert model.label_embs_concat is None
    assert model(source, features_only=True, output_layer=1)["x"].shape == mine["x"].shape


def test_untied_projection_and_two_label_sets():
    cfg = dataclasses.replace(hubert_tiny_config(), num_classes=[8, 5], untie_final_proj=True)
    model = HubertModel(cfg).eval()
    assert model.final_proj.out_features == 2 * cfg.final_dim and model.label_embs_concat.shape == (13, 16)
    source, a = batch(K=8)
    b = a % 5
    with torch.no_grad():
        out = model(source, target_list=[a, b])
    assert out["logit_m_list"][0].shape[1] == 8 and out["logit_m_list"][1].shape[1] == 5
    # set 1 uses the second half of final_proj and the last 5 embeddings
    x = out["x"][out["mask_indices"]]
    proj = model.final_proj(x)[:, 16:]
    expected = F.cosine_similarity(proj[:, None], model.label_embs_concat[8:][None], dim=-1) / 0.1
    torch.testing.assert_close(out["logit_m_list"][1], expected, atol=1e-4, rtol=0)
    L = out["x"].shape[1]  # 24 frames; the 25 labels at 50 Hz are cut to them
    assert torch.equal(out["target_m_list"][1], b[:, :L][out["mask_indices"]])
    tied = HubertModel(dataclasses.replace(cfg, untie_final_proj=False))
    assert tied.final_proj.out_features == cfg.final_dim


def test_padding_and_missing_labels_are_never_predicted():
    model = HubertModel(hubert_tiny_config()).eval()
    source, labels = batch(T=9600)
    padding = torch.zeros_like(source, dtype=torch.bool)
    padding[1, 6400:] = True
    labels[0, -3:] = -1  # e.g. a shorter utterance's label padding
    with torch.no_grad():
        out = model(source, padding_mask=padding, target_list=[labels])
    L = out["x"].shape[1]
    valid = ~out["padding_mask"] & (labels[:, :L] >= 0)
    assert out["target_m_list"][0].numel() + out["target_u_list"][0].numel() == int(valid.sum())
    assert (out["target_m_list"][0] >= 0).all() and (out["target_u_list"][0] >= 0).all()


def test_objective_terms_and_weights():
    cfg = hubert_tiny_config()
    model = HubertModel(cfg).eval()
    source, labels = batch()
    out = model(source, target_list=[labels])
    crit = HubertCriterion(pred_masked_weight=1.0, pred_nomask_weight=0.0, feature_pen_weight=10.0)
    res = crit.compute(out)
    M = out["target_m_list"][0].numel()
    ce = F.cross_entropy(out["logit_m_list"][0], out["target_m_list"][0], reduction="sum")
    assert int(res.sample_size) == M and res.loss.dtype == torch.float32
    torch.testing.assert_close(res.loss, ce + 10.0 * out["features_pen"] * M)
    acc = (out["logit_m_list"][0].argmax(-1) == out["target_m_list"][0]).float().mean()
    assert res.logs["accuracy"].item() == pytest.approx(acc.item())
    assert 0 <= res.logs["accuracy_unmasked"].item() <= 1

    both = HubertCriterion(1.0, 0.5, 0.0).compute(out)
    U = out["target_u_list"][0].numel()
    ce_u = F.cross_entropy(out["logit_u_list"][0], out["target_u_list"][0], reduction="sum")
    assert int(both.sample_size) == M + U
    torch.testing.assert_close(both.loss, ce + 0.5 * ce_u)

    obj = build_objective(CriterionConfig(name="hubert", loss_weights=[10.0], pred_nomask_weight=0.25), cfg)
    assert (obj.feature_pen_weight, obj.pred_nomask_weight) == (10.0, 0.25)
    with pytest.raises(ValueError, match="one extra loss"):
        build_objective(CriterionConfig(name="hubert", loss_weights=[0.1, 10.0]), cfg)
    with pytest.raises(ValueError, match="skips masked"):
        HubertCriterion().compute(HubertModel(dataclasses.replace(cfg, skip_masked=True))(source, target_list=[labels]))


def test_gradients_reach_label_embeddings_and_projection():
    model = HubertModel(hubert_tiny_config())
    source, labels = batch()
    res = HubertCriterion()(model, {"source": source, "target_list": [labels]})
    res.loss.backward()
    for name in ("label_embs_concat", "final_proj.weight", "mask_emb", "encoder.layers.0.fc1.weight",
                 "feature_extractor.conv_layers.0.conv.weight"):
        grad = model.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_loss_falls_in_a_few_steps():
    torch.manual_seed(0)
    cfg = dataclasses.replace(hubert_tiny_config(num_classes=[4]), feature_grad_mult=1.0)
    model = HubertModel(cfg)
    g = torch.Generator().manual_seed(5)
    # labels that the audio determines: the loudness class of each 20 ms frame
    amp = torch.randint(0, 4, (4, 25), generator=g)
    source = torch.randn(4, 8000, generator=g) * (0.05 + amp.float().repeat_interleave(320, 1))
    L = int(model.feature_extractor.output_lengths(torch.tensor(8000)))
    labels = amp[:, :L]
    mask = compute_mask_indices((4, L), None, 0.3, 2, min_masks=2, generator=torch.Generator().manual_seed(1))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    crit = HubertCriterion(1.0, 1.0, 10.0)
    losses = []
    for _ in range(12):
        out = model(source, target_list=[labels], mask_indices=mask)
        res = crit.compute(out)
        opt.zero_grad()
        (res.loss / res.sample_size).backward()
        opt.step()
        losses.append((res.loss / res.sample_size).item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_bad_inputs():
    model = HubertModel(hubert_tiny_config())
    source, labels = batch()
    with pytest.raises(ValueError, match="target_list"):
        model(source)
    with pytest.raises(ValueError, match="label sets"):
        model(source, target_list=[labels, labels])
    with pytest.raises(ValueError, match="label_rate"):
        HubertModel(dataclasses.replace(hubert_tiny_config(), label_rate=-1.0))(source, target_list=[labels])
    with pytest.raises(ValueError, match="num_classes"):
        HubertModel(dataclasses.replace(hubert_tiny_config(), num_classes=[0]))
