"""The speaker-ID model: SUPERB hidden states, weighted sum, masked pooling, frozen and fine-tuning modes."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from speechssl.models import Wav2Vec2Model, wav2vec2_tiny_config
from speechssl.models.pretrained import remove_pretraining_modules
from speechssl.models.speaker import (
    AttentiveStatsPooling,
    MeanPooling,
    SpeakerIdModel,
    speaker_cross_entropy,
    upstream_hidden_states,
)

SPEAKERS = ["a", "b", "c"]


def tiny_upstream(**overrides) -> Wav2Vec2Model:
    torch.manual_seed(0)
    settings = dict(dropout=0.0, attention_dropout=0.0, dropout_input=0.0, encoder_layerdrop=0.0)
    cfg = dataclasses.replace(wav2vec2_tiny_config(), **{**settings, **overrides})
    return remove_pretraining_modules(Wav2Vec2Model(cfg))


def batch(n: int = 3, samples: int = 4000) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    source = torch.randn(n, samples)
    pad = torch.zeros(n, samples, dtype=torch.bool)
    pad[1, samples // 2:] = True
    return source, pad


def step(model: SpeakerIdModel, source, pad, target) -> None:
    model.train()
    loss, _ = speaker_cross_entropy(model(source, pad)["logits"], target)
    loss.backward()


def test_hidden_states_are_transformer_input_and_every_layer(one_thread):
    up = tiny_upstream().eval()
    source, pad = batch()
    states, frame_pad = upstream_hidden_states(up, source, pad)
    assert len(states) == len(up.encoder.layers) + 1
    out = up(source, pad, mask=False, features_only=True)
    for got, want in zip(states[1:], out["layer_results"]):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(states[-1], out["x"])
    torch.testing.assert_close(states[1], up.encoder.layers[0](states[0], frame_pad))  # state 0 = layer-0 input
    assert frame_pad is not None and frame_pad[1].any() and not frame_pad[0].any()
    assert not up.encoder.dropout._forward_hooks and not up.encoder.layers[0]._forward_hooks  # hooks removed


def test_layerdrop_repeats_the_previous_state(one_thread):
    up = tiny_upstream(encoder_layerdrop=1.0).train()  # every layer skipped
    states, _ = upstream_hidden_states(up, *batch())
    assert len(states) == len(up.encoder.layers) + 1
    for s in states[1:]:
        torch.testing.assert_close(s, states[0])


def test_frozen_upstream_is_bit_identical_and_gets_no_gradient(one_thread):
    model = SpeakerIdModel(tiny_upstream(), SPEAKERS, freeze_upstream=True)
    before = {k: v.clone() for k, v in model.w2v_model.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.01)
    source, pad = batch()
    target = torch.tensor([0, 1, 2])
    for _ in range(3):
        step(model, source, pad, target)
        opt.step()
        opt.zero_grad()
    assert not model.w2v_model.training  # train() keeps a frozen upstream in eval mode
    step(model, source, pad, target)
    assert all(p.grad is None and not p.requires_grad for p in model.w2v_model.parameters())
    after = model.w2v_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.head.featurizer.weights.grad is not None and model.head.featurizer.weights.grad.abs().sum() > 0
    assert not torch.equal(model.head.featurizer.weights.detach(), torch.zeros(len(model.head.featurizer.weights)))


def test_finetuning_freezes_extractor_and_unfreezes_encoder_after_n_updates(one_thread):
    model = SpeakerIdModel(tiny_upstream(), SPEAKERS, freeze_upstream=False, freeze_finetune_updates=2)
    source, pad = batch()
    target = torch.tensor([0, 1, 2])
    model.set_num_updates(1)
    step(model, source, pad, target)
    assert all(p.grad is None for p in model.w2v_model.parameters())
    assert model.head.classifier.weight.grad is not None
    model.zero_grad()
    model.set_num_updates(2)
    step(model, source, pad, target)
    assert all(p.grad is None and not p.requires_grad for p in model.w2v_model.feature_extractor.parameters())
    enc = [p.grad for p in model.w2v_model.encoder.parameters()]
    assert all(g is not None for g in enc) and sum(float(g.abs().sum()) for g in enc) > 0
    assert model.w2v_model.training


def test_pooling_ignores_padded_frames(one_thread):
    torch.manual_seed(0)
    x = torch.randn(2, 7, 5)
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[0, 4:] = True
    garbage = x.clone()
    garbage[0, 4:] = 1e3
    for pool in (MeanPooling(5), AttentiveStatsPooling(5)):
        got = pool(garbage, pad)
        torch.testing.assert_close(got[0], pool(x[:1, :4], None)[0])
        torch.testing.assert_close(got[1], pool(x[1:], None)[0])
    torch.testing.assert_close(MeanPooling(5)(x[:1, :4]), x[:1, :4].mean(dim=1))
    assert AttentiveStatsPooling(5)(x).shape == (2, 10)


def test_speakers_travel_in_the_state_dict(one_thread):
    model = SpeakerIdModel(tiny_upstream(), SPEAKERS, pooling="attentive", projector_dim=16)
    other = SpeakerIdModel(tiny_upstream(), ["x", "y", "z"], pooling="attentive", projector_dim=16)
    other.load_state_dict(model.state_dict())
    assert other.speakers == SPEAKERS
    logits = other.eval()(*batch())["logits"]
    assert logits.shape == (3, 3) and torch.isfinite(logits).all()
    with pytest.raises(ValueError, match="pooling"):
        SpeakerIdModel(tiny_upstream(), SPEAKERS, pooling="max")


def test_cross_entropy_logs_accuracy():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0]])
    loss, logs = speaker_cross_entropy(logits, torch.tensor([0, 1, 1]))
    want = torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 1]), reduction="sum")
    torch.testing.assert_close(loss, want)
    assert int(logs["correct"]) == 2 and int(logs["count"]) == 3
    assert float(logs["accuracy"]) == pytest.approx(2 / 3)


def test_hubert_upstream_gives_the_same_hidden_states(one_thread):
    from speechssl.models.hubert import hubert_tiny

    torch.manual_seed(0)
    up = remove_pretraining_modules(hubert_tiny()).eval()
    model = SpeakerIdModel(up, SPEAKERS, freeze_upstream=True).eval()
    source, pad = batch()
    states, _ = upstream_hidden_states(up, source, pad)
    assert len(states) == len(up.encoder.layers) + 1
    torch.testing.assert_close(states[-1], up(source, pad, mask=False, features_only=True)["x"])
    assert model(source, pad)["logits"].shape == (3, 3)
