"""wav2vec 2.0 objective: negatives, InfoNCE logits, loss composition, gradients, learning."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from speechssl.config import CriterionConfig, ModelConfig
from speechssl.models import build_model, wav2vec2_tiny_config
from speechssl.objectives import (
    LossOutput,
    Wav2Vec2Criterion,
    build_objective,
    contrastive_logits,
    sample_negatives,
)

from wav2vec2_fixtures import single_thread  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("single_thread")


def tones(batch: int, samples: int, seed: int) -> torch.Tensor:
    """Piecewise-constant random tones (50 ms segments) plus a little noise: structured, learnable audio."""
    g = torch.Generator().manual_seed(seed)
    segment = torch.arange(samples) // 800
    freq = 100 + 900 * torch.rand(batch, int(segment.max()) + 1, generator=g)
    phase = torch.cumsum(2 * math.pi * freq[:, segment] / 16000, dim=1)
    return 0.5 * torch.sin(phase) + 0.01 * torch.randn(batch, samples, generator=g)


def padded_tones():
    source = tones(3, 16000, 0)
    padding_mask = torch.arange(16000)[None, :] >= torch.tensor([16000, 13000, 10000])[:, None]
    return source.masked_fill(padding_mask, 0.0), padding_mask


# --------------------------------------------------------------------------------------------------
# negatives and logits
# --------------------------------------------------------------------------------------------------


def test_negatives_never_the_positive_and_uniform_over_others():
    B, M, K = 4, 7, 3000
    idx = sample_negatives(B, M, K, generator=torch.Generator().manual_seed(0))
    assert idx.shape == (B, M, K) and idx.dtype == torch.long
    assert idx.min() >= 0 and idx.max() < M
    assert not (idx == torch.arange(M).view(1, M, 1)).any()
    counts = F.one_hot(idx, M).sum(2).float()  # (B, M, M): how often target j was drawn for frame i
    others = counts[:, ~torch.eye(M, dtype=torch.bool)]
    expected = K / (M - 1)
    assert (others - expected).abs().max() < 5 * math.sqrt(expected)
    with pytest.raises(ValueError, match="at least 2 masked frames"):
        sample_negatives(2, 1, 10)


def test_logits_match_gathered_cosine_similarity():
    """Same numbers as fairseq's compute_preds: cosine similarity with explicitly gathered distractors
    of the same utterance."""
    g = torch.Generator().manual_seed(0)
    B, M, K, D = 3, 9, 12, 16
    pred, targets = torch.randn(B, M, D, generator=g), torch.randn(B, M, D, generator=g)
    idx = sample_negatives(B, M, K, generator=g)
    negs = targets[torch.arange(B)[:, None, None], idx]  # (B, M, K, D): from the same utterance
    candidates = torch.cat([targets.unsqueeze(2), negs], dim=2)
    expected = F.cosine_similarity(pred.unsqueeze(2), candidates, dim=-1) / 0.1
    logits = contrastive_logits(pred, targets, idx, 0.1)
    assert logits.shape == (B, M, K + 1)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)


def test_identical_candidates_are_masked():
    g = torch.Generator().manual_seed(1)
    B, M, K, D = 2, 6, 40, 8
    targets = torch.randn(B, M, D, generator=g)
    targets[:, 3] = targets[:, 1]  # frames 1 and 3 have identical targets
    codes = torch.arange(M).repeat(B, 1)
    codes[:, 3] = 1
    pred = torch.randn(B, M, D, generator=g)
    idx = sample_negatives(B, M, K, generator=g)
    same = ((idx == 3) & (torch.arange(M).view(1, M, 1) == 1)) | ((idx == 1) & (torch.arange(M).view(1, M, 1) == 3))
    assert same.any()
    for given in (codes.unsqueeze(-1), None):  # by quantizer codes, or by exact vector comparison
        logits = contrastive_logits(pred, targets, idx, 0.1, given)
        assert torch.equal(torch.isinf(logits[..., 1:]), same)
        assert torch.isfinite(logits[..., 0]).all()


# --------------------------------------------------------------------------------------------------
# the criterion
# --------------------------------------------------------------------------------------------------


def test_loss_is_sum_of_terms_with_fairseq_scaling():
    torch.manual_seed(0)
    cfg = wav2vec2_tiny_config()
    model = build_model(cfg).train()
    objective = build_objective(CriterionConfig(), cfg)
    source, padding_mask = padded_tones()
    out = model(source, padding_mask)
    B, M = out["pred"].shape[:2]
    idx = sample_negatives(B, M, cfg.num_negatives)
    result = objective.compute(out, idx)
    assert isinstance(result, LossOutput)
    assert result.loss.dtype == torch.float32 and result.loss.dim() == 0
    assert result.sample_size == B * M == result.logs["num_masked"]
    logits = contrastive_logits(out["pred"], out["targets"], idx, cfg.logit_temp, out["codes"])
    nce = F.cross_entropy(logits.view(B * M, -1), torch.zeros(B * M, dtype=torch.long), reduction="sum")
    diversity = (out["num_vars"] - out["prob_perplexity"]) / out["num_vars"]
    pen = (out["conv_features"].float() ** 2).mean()
    expected = nce + 0.1 * diversity * B * M + 10.0 * pen * B * M
    torch.testing.assert_close(result.loss, expected)
    assert result.logs["contrastive"].item() == pytest.approx(nce.item() / (B * M), rel=1e-6)
    assert result.logs["diversity"].item() == pytest.approx(diversity.item(), rel=1e-6)
    assert result.logs["feature_pen"].item() == pytest.approx(pen.item(), rel=1e-6)
    for key in ("accuracy", "code_perplexity", "prob_perplexity", "temp"):
        assert key in result.logs
    assert all(not torch.is_tensor(v) or not v.requires_grad for v in result.logs.values())


def test_loss_weights_and_config_errors():
    cfg = wav2vec2_tiny_config()
    crit = build_objective(CriterionConfig(loss_weights=[0.5, 2.0]), cfg)
    assert (crit.diversity_weight, crit.feature_pen_weight) == (0.5, 2.0)
    crit = build_objective(CriterionConfig(loss_weights=[0.3]), cfg)
    assert (crit.diversity_weight, crit.feature_pen_weight) == (0.3, 0.3)
    with pytest.raises(ValueError, match="loss_weights"):
        build_objective(CriterionConfig(loss_weights=[1.0, 2.0, 3.0]), cfg)
    with pytest.raises(ValueError, match="infonce"):
        build_objective(CriterionConfig(infonce=False), cfg)
    with pytest.raises(ValueError, match="criterion.name"):
        build_objective(CriterionConfig(name="nope"), cfg)
    with pytest.raises(ValueError, match="model.name"):
        build_model(ModelConfig(name="nope"))
    with pytest.raises(ValueError, match="cross_sample_negatives"):
        build_model(dataclasses.replace(cfg, cross_sample_negatives=10))


def test_losses_stay_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    cfg = wav2vec2_tiny_config()
    model = build_model(cfg).train()
    source, padding_mask = padded_tones()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        result = build_objective(CriterionConfig(), cfg)(model, dict(source=source, padding_mask=padding_mask))
    assert result.loss.dtype == torch.float32 and torch.isfinite(result.loss)
    result.loss.backward()
    assert model.mask_emb.grad is not None and torch.isfinite(model.mask_emb.grad).all()


# --------------------------------------------------------------------------------------------------
# gradients
# --------------------------------------------------------------------------------------------------


def grads_after_one_step(cfg, train=True, seed=0):
    torch.manual_seed(seed)
    model = build_model(cfg).train(train)
    source, padding_mask = padded_tones()
    result = build_objective(CriterionConfig(), cfg)(model, dict(source=source, padding_mask=padding_mask))
    (result.loss / result.sample_size).backward()
    return model, {n: p.grad for n, p in model.named_parameters()}


def test_every_parameter_learns():
    _, grads = grads_after_one_step(wav2vec2_tiny_config())
    dead = [n for n, g in grads.items() if g is None or not torch.isfinite(g).all() or g.abs().sum() == 0]
    assert not dead


def test_frozen_extractor_gets_no_gradient_but_mask_embedding_does():
    cfg = dataclasses.replace(wav2vec2_tiny_config(), feature_grad_mult=0.0)
    model, grads = grads_after_one_step(cfg)
    extractor = {n for n, _ in model.named_parameters() if n.startswith("feature_extractor.")}
    assert extractor and all(grads[n] is None for n in extractor)
    assert grads["mask_emb"] is not None and grads["mask_emb"].abs().sum() > 0
    live = [n for n, g in grads.items() if n not in extractor and (g is None or g.abs().sum() == 0)]
    assert not live


def test_feature_grad_mult_scales_extractor_gradient():
    """Eval mode (argmax codes, no dropout) with the same masks and distractors: the extractor's
    gradient scales with feature_grad_mult, everything else is unchanged."""
    def run(mult):
        torch.manual_seed(0)
        cfg = dataclasses.replace(wav2vec2_tiny_config(), feature_grad_mult=mult)
        model = build_model(cfg).eval()
        source, padding_mask = padded_tones()
        torch.manual_seed(1)
        out = model(source, padding_mask)
        idx = sample_negatives(*out["pred"].shape[:2], cfg.num_negatives, generator=torch.Generator().manual_seed(2))
        Wav2Vec2Criterion(cfg.num_negatives).compute(out, idx).loss.backward()
        return {n: p.grad for n, p in model.named_parameters()}

    full, tenth = run(1.0), run(0.1)
    for name in full:
        scale = 0.1 if name.startswith("feature_extractor.") else 1.0
        torch.testing.assert_close(tenth[name], scale * full[name], rtol=1e-4,
                                   atol=1e-5 * scale * full[name].abs().max().item())


# --------------------------------------------------------------------------------------------------
# learning
# --------------------------------------------------------------------------------------------------


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    cfg = dataclasses.replace(wav2vec2_tiny_config(), dropout=0.0, attention_dropout=0.0, dropout_input=0.0,
                              dropout_features=0.0)
    model = build_model(cfg).train()
    objective = build_objective(CriterionConfig(), cfg)
    batch = dict(source=tones(4, 16000, 0))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    history = []
    for step in range(100):
        model.set_num_updates(step)
        result = objective(model, batch)
        optimizer.zero_grad()
        (result.loss / result.sample_size).backward()
        optimizer.step()
        history.append([float(result.logs[k]) for k in ("contrastive", "accuracy", "code_perplexity")])
    h = torch.tensor(history)
    start, end = h[:5].mean(0), h[-10:].mean(0)
    chance = math.log(cfg.num_negatives + 1)
    assert start[0] > 0.9 * chance
    assert end[0] < 0.6 * start[0], (start, end)
    assert end[1] > 0.4 and end[1] > 3 * start[1], (start, end)
    assert end[2] > 8, "code perplexity collapsed"
