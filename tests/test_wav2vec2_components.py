"""wav2vec 2.0 building blocks: dropout, attention, quantizer, encoder options, configurations."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from speechssl.models import (
    Wav2Vec2Model,
    build_model,
    wav2vec2_base_config,
    wav2vec2_large_config,
    wav2vec2_tiny_config,
)
from speechssl.models.components import (
    ConvFeatureExtractor,
    SelfAttention,
    TransformerEncoder,
    conv1d_nlc,
    dropout,
)
from speechssl.models.quantizer import GumbelVectorQuantizer

from wav2vec2_fixtures import single_thread  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("single_thread")


def test_cpu_dropout_statistics_and_gradient():
    torch.manual_seed(0)
    x = torch.ones(1000, 1000, requires_grad=True)
    y = dropout(x, 0.1, training=True)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.9) < 0.002
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 1 / 0.9))
    y.sum().backward()
    torch.testing.assert_close(x.grad, kept.float() / 0.9)
    assert dropout(x, 0.1, training=False) is x
    bf = dropout(torch.ones(64, 64, dtype=torch.bfloat16), 0.5, True)
    assert bf.dtype == torch.bfloat16 and set(bf.unique().tolist()) <= {0.0, 2.0}
    torch.manual_seed(1)
    a = dropout(torch.ones(100), 0.3, True)
    torch.manual_seed(1)
    assert torch.equal(a, dropout(torch.ones(100), 0.3, True))  # reproducible from the global seed


def test_attention_dropout_path_equals_fused_path():
    """With attention dropout, CPU training computes softmax(QK^T)V explicitly: same function as SDPA."""
    torch.manual_seed(0)
    attn = SelfAttention(32, 4, dropout=1e-9).train()  # explicit path; keeps every weight
    x = torch.randn(3, 20, 32)
    pad = torch.arange(20)[None, :] >= torch.tensor([20, 15, 9])[:, None]
    explicit = attn(x, pad)
    attn.eval()
    fused = attn(x, pad)
    torch.testing.assert_close(explicit, fused, atol=1e-5, rtol=1e-5)
    # padded keys are ignored: changing padded inputs leaves valid outputs unchanged
    x2 = x.masked_fill(pad.unsqueeze(-1), 5.0)
    torch.testing.assert_close(attn(x2, pad)[~pad], fused[~pad], atol=1e-5, rtol=1e-5)


def test_attention_with_a_learned_bias_matches_sdpa_and_trains_the_bias():
    """A bias that needs a gradient (data2vec 2.0's ALiBi scales) takes the explicit CPU path: the same
    outputs as SDPA with the same bias, padded keys ignored, and the bias gets softmax's gradient (checked
    against an independent float64 computation)."""
    torch.manual_seed(0)
    attn = SelfAttention(32, 4).eval()
    x = torch.randn(3, 20, 32)
    pad = torch.arange(20)[None, :] >= torch.tensor([20, 15, 9])[:, None]
    distance = (torch.arange(20)[:, None] - torch.arange(20)[None, :]).abs().float()
    scale = torch.tensor([0.5, 0.25, 0.125, 0.0625], requires_grad=True)
    bias = -scale[:, None, None] * distance  # (H, L, L), broadcast over the batch
    out = attn(x, pad, bias[None])
    fused = attn(x, pad, bias[None].detach())  # no gradient needed: SDPA
    torch.testing.assert_close(out, fused, atol=1e-5, rtol=1e-5)
    grad_out = torch.randn_like(out).masked_fill(pad[..., None], 0.0)
    (g_scale,) = torch.autograd.grad(out, scale, grad_out)
    # float64 reference: softmax(QK^T / sqrt(d) + bias) V, written out
    with torch.no_grad():
        q, k, v = attn.qkv_proj(x).double().view(3, 20, 3, 4, 8).permute(2, 0, 3, 1, 4).unbind(0)
    s64 = scale.detach().double().requires_grad_(True)
    logits = q @ k.transpose(-2, -1) / 8**0.5 - s64[:, None, None] * distance.double()
    probs = logits.masked_fill(pad[:, None, None, :], float("-inf")).softmax(-1)
    ref = attn.out_proj.double()((probs @ v).transpose(1, 2).reshape(3, 20, 32))
    attn.out_proj.float()
    (g_ref,) = torch.autograd.grad(ref, s64, grad_out.double())
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g_scale.double(), g_ref, atol=1e-4, rtol=1e-4)
    assert g_scale.abs().min() > 0


@pytest.mark.parametrize("kernel,stride", [(3, 2), (2, 2), (10, 5), (4, 3), (1, 1), (2, 5)])
def test_channels_last_conv_matches_conv1d(kernel, stride):
    torch.manual_seed(0)
    x = torch.randn(3, 6, 41, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 6, kernel, dtype=torch.float64, requires_grad=True)
    ref = F.conv1d(x, w, stride=stride)
    grad = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, (x, w), grad)
    out = conv1d_nlc(x.transpose(1, 2), w, stride)
    torch.testing.assert_close(out, ref.transpose(1, 2))
    grads = torch.autograd.grad(out, (x, w), grad.transpose(1, 2))
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert conv1d_nlc(x.float().transpose(1, 2), w.float(), stride).dtype == torch.bfloat16


@pytest.mark.parametrize("mode,bias", [("default", False), ("layer_norm", True), ("layer_norm", False)])
def test_conv_extractor_layouts_agree(mode, bias):
    """The CPU path (channels-last, strided matmuls, covariance statistics) and the CUDA path (channels-first
    F.conv1d / cuDNN, fp32 GroupNorm) compute the same function, forward and backward, fp32 and bf16."""
    torch.manual_seed(0)
    layers = [(16, 10, 5), (16, 3, 2), (16, 3, 2), (16, 2, 2)]
    extractor = ConvFeatureExtractor(layers, mode=mode, conv_bias=bias)
    for block in extractor.conv_layers:  # non-identity norm affines
        if block.norm is not None:
            torch.nn.init.uniform_(block.norm.weight, 0.5, 1.5)
            torch.nn.init.uniform_(block.norm.bias, -0.5, 0.5)
    source = torch.randn(3, 1234)
    outs, grads = [], []
    for forward in (extractor.forward_channels_last, extractor.forward_channels_first):
        x = source.clone().requires_grad_()
        y = forward(x)
        y.pow(2).sum().backward()
        outs.append(y)
        grads.append([x.grad] + [p.grad.clone() for p in extractor.parameters()])
        extractor.zero_grad()
    assert outs[0].shape == outs[1].shape == (3, int(extractor.output_lengths(torch.tensor(1234))), 16)
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-4)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(extractor(source), outs[0], atol=0, rtol=0)  # CPU tensors: channels-last
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = [extractor.forward_channels_last(source), extractor.forward_channels_first(source)]
    assert low[0].dtype == low[1].dtype == torch.bfloat16
    torch.testing.assert_close(low[0].float(), low[1].float(), atol=0.1, rtol=0.05)


def test_output_lengths_match_conv_stack():
    extractor = ConvFeatureExtractor(wav2vec2_tiny_config().conv_feature_layers)
    for samples in (400, 401, 719, 720, 16000, 16321):
        frames = extractor(torch.zeros(1, samples)).shape[1]
        assert extractor.output_lengths(torch.tensor(samples)).item() == frames == extractor.num_frames(samples)
    assert extractor.output_lengths(torch.tensor(0)).item() == 0 == extractor.num_frames(0)
    assert extractor.num_frames(399) == 0 and extractor.num_frames(-5) == 0
    with pytest.raises(ValueError, match="receptive field"):
        extractor(torch.zeros(1, 300))
    with pytest.raises(ValueError, match="extractor_mode"):
        ConvFeatureExtractor([(8, 2, 2)], mode="batch_norm")


def test_quantizer_temperature_schedule():
    q = GumbelVectorQuantizer(8, 4, 2, 8, temp=(2.0, 0.5, 0.999995))
    assert q.curr_temp == 2.0
    q.set_num_updates(100_000)
    assert q.curr_temp == pytest.approx(2.0 * 0.999995**100_000)
    q.set_num_updates(10_000_000)
    assert q.curr_temp == 0.5
    model = build_model(wav2vec2_tiny_config())
    model.set_num_updates(1000)
    assert model.quantizer.curr_temp == pytest.approx(2.0 * 0.999995**1000)


def test_quantizer_eval_selects_argmax_codevectors():
    torch.manual_seed(0)
    q = GumbelVectorQuantizer(8, 5, 2, 6).eval()
    x = torch.randn(4, 7, 8)
    out = q(x)
    logits = q.weight_proj(x).view(4, 7, 2, 5)
    codes = logits.argmax(-1)
    assert torch.equal(out["codes"], codes)
    book = q.vars.view(2, 5, 3)
    expected = torch.cat([book[0][codes[..., 0]], book[1][codes[..., 1]]], dim=-1)
    assert torch.equal(out["x"], expected)
    hard = F.one_hot(codes.view(-1, 2), 5).float().mean(0)
    ppl = torch.exp(-(hard * torch.log(hard + 1e-7)).sum(-1)).sum()
    assert out["code_perplexity"].item() == pytest.approx(ppl.item(), rel=1e-6)
    soft = logits.view(-1, 2, 5).softmax(-1).mean(0)
    ppl = torch.exp(-(soft * torch.log(soft + 1e-7)).sum(-1)).sum()
    assert out["prob_perplexity"].item() == pytest.approx(ppl.item(), rel=1e-6)
    padded = torch.zeros(4, 7, dtype=torch.bool)
    padded[1:, 3:] = True  # perplexities only over the valid frames
    masked = q(x, padded)
    valid = q(x[~padded])
    assert torch.equal(masked["x"], out["x"])
    for key in ("code_perplexity", "prob_perplexity"):
        assert masked[key].item() == pytest.approx(valid[key].item(), rel=1e-6)


def test_quantizer_straight_through_gradient_matches_one_hot_product():
    """Index-based selection gives the same values and gradients as fairseq's
    ``gumbel_softmax(hard=True)`` one-hot multiplied with the codebook."""
    torch.manual_seed(0)
    q = GumbelVectorQuantizer(8, 5, 2, 6, temp=(1.5, 0.5, 0.9)).train()
    x = torch.randn(30, 8)
    weight = torch.randn(30, 6)
    torch.manual_seed(1)
    out = q(x)
    (out["x"] * weight).sum().backward()
    ours = {n: p.grad.clone() for n, p in q.named_parameters()}
    q.zero_grad()
    torch.manual_seed(1)  # same gumbel noise: exponential_() on a tensor of the logits' shape
    logits = q.weight_proj(x).float().view(30, 2, 5)
    gumbels = -torch.empty_like(logits).exponential_().log()
    soft = ((logits + gumbels) / 1.5).softmax(-1)
    hard = F.one_hot(soft.argmax(-1), 5).float()
    st = hard - soft.detach() + soft
    ref = torch.einsum("ngv,gvd->ngd", st, q.vars.view(2, 5, 3)).reshape(30, 6)
    (ref * weight).sum().backward()
    torch.testing.assert_close(out["x"], ref)
    for name, p in q.named_parameters():
        torch.testing.assert_close(ours[name], p.grad, atol=1e-6, rtol=1e-5)


def test_encoder_output_layer_and_layerdrop():
    torch.manual_seed(0)
    enc = TransformerEncoder(16, 32, 4, 2, 0.0, 0.0, 0.0, False, layerdrop=0.5, conv_pos=4, conv_pos_groups=2)
    x = torch.randn(2, 10, 16)
    enc.eval()
    full, layers = enc(x)
    assert len(layers) == 4 and torch.equal(full, layers[-1])
    second, partial = enc(x, output_layer=2)
    assert len(partial) == 2 and torch.equal(second, layers[1])
    enc.train()
    counts = {len(enc(x)[1]) for _ in range(30)}
    assert len(counts) > 1 and max(counts) <= 4  # LayerDrop skips layers in training only
    with pytest.raises(ValueError, match="output_layer"):
        enc(x, output_layer=5)


def test_pre_ln_encoder_applies_final_layer_norm_except_at_output_layer():
    torch.manual_seed(0)
    enc = TransformerEncoder(16, 32, 2, 2, 0.0, 0.0, 0.0, True, 0.0, conv_pos=4, conv_pos_groups=2).eval()
    x = torch.randn(2, 10, 16)
    out, layers = enc(x)
    torch.testing.assert_close(out, enc.layer_norm(layers[-1]))
    last, _ = enc(x, output_layer=2)
    assert torch.equal(last, layers[-1])


def test_channel_masking_zeroes_whole_channels():
    cfg = dataclasses.replace(wav2vec2_tiny_config(), mask_prob=0.0, mask_channel_prob=0.5, mask_channel_length=8)
    model = Wav2Vec2Model(cfg)
    x = torch.randn(3, 20, cfg.encoder_embed_dim) + 10.0
    masked, idx = model.apply_mask(x, None)
    assert idx is None
    zero = (masked == 0).all(dim=1)  # (B, D) channels zeroed over every frame
    assert zero.any(dim=1).all()
    assert torch.equal(masked[~zero.unsqueeze(1).expand_as(masked)], x[~zero.unsqueeze(1).expand_as(x)])


def test_features_only_and_no_mask_outputs():
    torch.manual_seed(0)
    model = build_model(wav2vec2_tiny_config()).eval()
    source = torch.randn(2, 8000)
    out = model(source, mask=False, features_only=True)
    assert out["mask_indices"] is None and out["padding_mask"] is None and "pred" not in out
    assert out["x"].shape == (2, 24, 48) and out["features"].shape == (2, 24, 32)
    with pytest.raises(ValueError, match="mask=True"):
        model(source, mask=False)
    layer1 = model(source, mask=False, features_only=True, output_layer=1)
    torch.testing.assert_close(layer1["x"], out["layer_results"][0])


def test_published_configurations():
    base, large = wav2vec2_base_config(), wav2vec2_large_config()
    with torch.device("meta"):
        n_base = sum(p.numel() for p in build_model(base).parameters())
        n_large = sum(p.numel() for p in build_model(large).parameters())
    assert 94e6 < n_base < 96e6 and 316e6 < n_large < 319e6
    assert (base.extractor_mode, base.conv_bias, base.layer_norm_first) == ("default", False, False)
    assert (large.extractor_mode, large.conv_bias, large.layer_norm_first) == ("layer_norm", True, True)
    assert base.latent_temp == (2.0, 0.5, 0.999995) and base.mask_prob == 0.65 and base.num_negatives == 100
    tiny = build_model(wav2vec2_tiny_config())
    assert sum(p.numel() for p in tiny.parameters()) < 200_000


def _collapsed_quantizer(groups: int = 2, num_vars: int = 32) -> GumbelVectorQuantizer:
    """A quantizer whose logits always pick entry 0 of every group, by a margin the gumbel noise often
    overturns (so the sampled codes are spread while the argmax codes use one entry per group)."""
    q = GumbelVectorQuantizer(8, num_vars, groups, 8)
    with torch.no_grad():
        q.weight_proj.weight.zero_()
        q.weight_proj.bias.zero_()
        q.weight_proj.bias.view(groups, num_vars)[:, 0] = 2.0
    return q


def test_quantizer_training_code_perplexity_is_of_the_argmax_before_noise():
    """fairseq's ``code_perplexity`` uses the argmax of the logits, in training too: a collapsed codebook
    reports G (2.0) although the gumbel-sampled codes spread over many entries."""
    torch.manual_seed(0)
    q = _collapsed_quantizer().train()
    out = q(torch.randn(4000, 8))
    assert out["code_perplexity"].item() == pytest.approx(2.0, abs=1e-4)
    sampled = F.one_hot(out["codes"].view(-1, 2), 32).float().mean(0)
    sampled_ppl = torch.exp(-(sampled * torch.log(sampled + 1e-7)).sum(-1)).sum().item()
    assert sampled_ppl > 20  # the sampled codes do not show the collapse
    assert out["prob_perplexity"].item() > 20
    q.eval()
    assert q(torch.randn(50, 8))["code_perplexity"].item() == pytest.approx(2.0, abs=1e-4)


def test_quantizer_training_statistics():
    """Training mode: the selected codes are the argmax of logits + gumbel noise, the perplexities are of
    the noise-free argmax codes and of the batch-averaged noise-free softmax (padded frames left out)."""
    torch.manual_seed(0)
    q = GumbelVectorQuantizer(8, 5, 2, 6).train()
    x = torch.randn(6, 9, 8)
    padded = torch.zeros(6, 9, dtype=torch.bool)
    padded[2:, 5:] = True
    out = q(x, padded)
    logits = q.weight_proj(x).view(6, 9, 2, 5)[~padded].view(-1, 2, 5)
    hard = F.one_hot(logits.argmax(-1), 5).float().mean(0)
    ppl = torch.exp(-(hard * torch.log(hard + 1e-7)).sum(-1)).sum()
    assert out["code_perplexity"].item() == pytest.approx(ppl.item(), rel=1e-6)
    soft = logits.softmax(-1).mean(0)
    ppl = torch.exp(-(soft * torch.log(soft + 1e-7)).sum(-1)).sum()
    assert out["prob_perplexity"].item() == pytest.approx(ppl.item(), rel=1e-5)
    book = q.vars.view(2, 5, 3)
    codes = out["codes"]
    expected = torch.cat([book[0][codes[..., 0]], book[1][codes[..., 1]]], dim=-1)
    assert torch.equal(out["x"], expected)
    # the sampled codes differ from the argmax somewhere (noise), and the temperature is reported
    assert not torch.equal(codes, q.weight_proj(x).view(6, 9, 2, 5).argmax(-1))
    assert out["temp"] == q.curr_temp
