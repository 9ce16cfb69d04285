"""The CUDA-relevant paths on the test device, against the CPU: models, objectives, masking, quantizer,
trainer and resume, k-means, interop, CTC.

The device is ``$SPEECHSSL_TEST_DEVICE`` (default ``cpu``, where every comparison is CPU against CPU and
the module only keeps the code paths running); ``tools/gpu_check.sh`` runs it with ``cuda``. On CUDA a
micro-batch's forward and backward also run under ``torch.cuda.set_sync_debug_mode("error")``: any
host-device synchronisation fails the test at the line that causes it.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os

import pytest
import torch

from speechssl.cluster.kmeans import KMeansSettings, fit_kmeans, inertia, nearest_centroids
from speechssl.config import CriterionConfig
from speechssl.models import build_model, hubert_tiny_config, wav2vec2_tiny_config
from speechssl.models.components import ConvFeatureExtractor, compile_transformer_layers
from speechssl.models.frontend import FbankFeatureExtractor
from speechssl.models.masking import mask_positions, span_mask
from speechssl.objectives import build_objective, sample_negatives
from speechssl.train.distributed import DistEnv
from speechssl.train.trainer import Trainer
from train_fixtures import state_of, toy_config

DEVICE = torch.device(os.environ.get("SPEECHSSL_TEST_DEVICE", "cpu"))
CUDA = DEVICE.type == "cuda"
if CUDA and not torch.cuda.is_available():
    pytest.skip("SPEECHSSL_TEST_DEVICE=cuda but CUDA is not available", allow_module_level=True)

pytestmark = pytest.mark.usefixtures("one_thread", "ieee")


@pytest.fixture
def ieee():
    """IEEE fp32 matmuls and convolutions (cuDNN allows TF32 by default): the comparisons are of fp32."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


@contextlib.contextmanager
def no_sync():
    """On CUDA: any host-device synchronisation inside raises (the test fails where it happens)."""
    if not CUDA:
        yield
        return
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def on(device, *tensors):
    return [None if t is None else t.to(device) for t in tensors]


def close(a, b, tol=1e-4):
    torch.testing.assert_close(a.detach().cpu().float(), b.detach().cpu().float(), rtol=tol, atol=tol)


def padding(lengths, total):
    return torch.arange(total)[None, :] >= torch.tensor(lengths)[:, None]


# --------------------------------------------------------------------------------------------------
# front-ends, masking, quantizer
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode,bias", [("default", False), ("layer_norm", True)])
def test_conv_extractor_on_device_equals_cpu(mode, bias):
    torch.manual_seed(0)
    cpu = ConvFeatureExtractor([(16, 10, 5), (16, 3, 2), (16, 2, 2)], mode=mode, conv_bias=bias)
    dev = copy.deepcopy(cpu).to(DEVICE)
    source = torch.randn(3, 4000)
    outs = []
    for model, x in ((cpu, source.clone()), (dev, source.to(DEVICE))):
        x.requires_grad_()
        y = model(x)
        y.pow(2).sum().backward()
        outs.append((y, x.grad, model.conv_layers[1].conv.weight.grad))
    for a, b in zip(*outs):
        close(a, b, 1e-3)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        assert dev(source.to(DEVICE)).dtype == torch.bfloat16


def test_fbank_front_end_on_device_equals_cpu():
    fe = FbankFeatureExtractor()
    source = torch.randn(2, 16000)
    close(fe.to(DEVICE)(source.to(DEVICE)), FbankFeatureExtractor()(source), 1e-3)


def test_masking_on_device():
    pad = padding([600, 450, 300], 600).to(DEVICE)
    g = torch.Generator(device=DEVICE).manual_seed(0)
    with no_sync():
        mask, covered = span_mask((3, 600), pad, 0.65, 10, min_masks=2, generator=g)
        idx = mask_positions(mask, 1)
    mask, covered = mask.cpu(), covered.cpu()
    counts = mask.sum(1)
    assert mask.device.type == "cpu" and (counts == counts[0]).all() and not (mask & pad.cpu()).any()
    assert 0.2 < counts[0].item() / 300 < 0.8 and (covered == -1).all() and idx.shape == (3, 1)
    M = int(counts[0])
    x = torch.randn(3, 600, 4)
    close(x.to(DEVICE).gather(1, mask_positions(mask.to(DEVICE), M)[..., None].expand(-1, -1, 4)),
          x[mask].view(3, M, 4), 0)


def test_quantizer_on_device_equals_cpu():
    torch.manual_seed(0)
    cpu = build_model(wav2vec2_tiny_config()).quantizer.eval()
    dev = copy.deepcopy(cpu).to(DEVICE)
    x = torch.randn(40, 32)
    a, b = cpu(x), dev(x.to(DEVICE))
    assert torch.equal(a["codes"], b["codes"].cpu())
    close(a["x"], b["x"])
    close(a["prob_perplexity"], b["prob_perplexity"])
    # training: the straight-through gradient reaches the logits and the codebook on the device
    dev.train()
    with no_sync():
        out = dev(x.to(DEVICE))
        out["x"].sum().backward()
    assert dev.vars.grad.abs().sum() > 0 and dev.weight_proj.weight.grad.abs().sum() > 0


# --------------------------------------------------------------------------------------------------
# models and objectives
# --------------------------------------------------------------------------------------------------


def _pair(cfg):
    torch.manual_seed(0)
    cpu = build_model(cfg)
    dev = copy.deepcopy(cpu).to(DEVICE)
    return cpu, dev


@pytest.mark.parametrize("front_end", ["default", "fbank"])
def test_wav2vec2_loss_and_gradients_on_device_equal_cpu(front_end):
    cfg = dataclasses.replace(wav2vec2_tiny_config(), extractor_mode=front_end)
    cpu, dev = _pair(cfg)
    objective = build_objective(CriterionConfig(), cfg)
    source, pad = torch.randn(3, 8000), padding([8000, 6400, 7200], 8000)
    mask = span_mask((3, 24), padding([24, 19, 21], 24), 0.65, 4, min_masks=2,
                     generator=torch.Generator().manual_seed(0))[0]
    results = []
    for model in (cpu, dev):
        model.eval()  # no dropout, argmax codes: the same function on both devices
        s, p, m = on(next(model.parameters()).device, source, pad, mask)
        out = model(s, p, mask_indices=m)
        neg = sample_negatives(3, out["pred"].shape[1], cfg.num_negatives, generator=torch.Generator().manual_seed(1))
        res = objective.compute(out, neg.to(s.device))
        res.loss.backward()
        grads = [p.grad for p in (model.encoder.layers[0].fc1.weight, model.quantizer.weight_proj.weight,
                                  *model.feature_extractor.parameters())]
        results.append((res.loss, out["pred"], out["targets"], *grads))
    for a, b in zip(*results):
        close(a, b, 1e-3)


def test_wav2vec2_training_micro_batch_has_no_sync():
    cfg = wav2vec2_tiny_config()
    model = build_model(cfg).to(DEVICE).train()
    objective = build_objective(CriterionConfig(), cfg)
    batch = {"source": torch.randn(3, 8000, device=DEVICE), "padding_mask": padding([8000, 6400, 7200], 8000).to(DEVICE)}
    for dtype in (None, torch.bfloat16):
        with torch.autocast(DEVICE.type, dtype=dtype or torch.float32, enabled=dtype is not None), no_sync():
            out = objective(model, batch)
            (out.loss / out.sample_size).backward()
        assert torch.isfinite(out.loss).item()


def test_hubert_loss_and_gradients_on_device_equal_cpu_without_sync():
    cfg = hubert_tiny_config()
    cpu, dev = _pair(cfg)
    objective = build_objective(CriterionConfig(name="hubert", loss_weights=[10.0]), cfg)
    source, pad = torch.randn(2, 8000), padding([8000, 6400], 8000)
    labels = torch.randint(0, 8, (2, 25))
    mask = span_mask((2, 24), None, 0.8, 4, min_masks=2, generator=torch.Generator().manual_seed(0))[0]
    results = []
    for model in (cpu, dev):
        model.eval()
        s, p, t, m = on(next(model.parameters()).device, source, pad, labels, mask)
        out = model(s, p, mask_indices=m, target_list=[t], skip_nomask=True)
        res = objective.compute(out)
        res.loss.backward()
        results.append((res.loss, out["logit_m_list"][0], model.label_embs_concat.grad, model.final_proj.weight.grad))
    for a, b in zip(*results):
        close(a, b, 1e-3)
    dev.train()
    with no_sync():
        res = objective(dev, {"source": source.to(DEVICE), "padding_mask": pad.to(DEVICE), "target_list": [labels.to(DEVICE)]})
        (res.loss / res.sample_size).backward()


def test_data2vec2_loss_gradients_and_teacher_on_device_equal_cpu_without_sync():
    from speechssl.models import data2vec2_tiny_config
    from speechssl.models.masking import block_mask

    cfg = dataclasses.replace(data2vec2_tiny_config(), mask_noise_std=0.0)  # no random decoder input
    cpu, dev = _pair(cfg)
    objective = build_objective(CriterionConfig(name="data2vec2"), cfg)
    source = torch.randn(2, 8000)
    mask = block_mask((2 * cfg.clone_batch, 24), cfg.mask_prob, cfg.mask_length, cfg.mask_prob_adjust,
                      generator=torch.Generator().manual_seed(0))
    results = []
    for model in (cpu, dev):
        model.eval()  # no dropout: the same function on both devices
        s, m = on(next(model.parameters()).device, source, mask)
        out = model(s, mask_indices=m)
        res = objective.compute(out)
        res.loss.backward()
        torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
        model.update_teacher(3)
        results.append((res.loss, out["pred"], out["targets"], res.logs["target_var"], model.encoder.alibi_scale.grad,
                        model.decoder.proj.weight.grad, model.teacher.layers[0].fc1.weight))
    for a, b in zip(*results):
        close(a, b, 1e-3)
    dev.train()
    for dtype in (None, torch.bfloat16):
        with torch.autocast(DEVICE.type, dtype=dtype or torch.float32, enabled=dtype is not None), no_sync():
            res = objective(dev, {"source": source.to(DEVICE)})
            (res.loss / res.sample_size).backward()
            dev.update_teacher(4)
        assert torch.isfinite(res.loss).item()


def test_ctc_loss_on_device_equals_cpu():
    from speechssl.models.ctc import build_ctc_model
    from speechssl.objectives.ctc import CtcCriterion
    from speechssl.text.vocab import Vocabulary

    vocab = Vocabulary(["<s>", "<pad>", "</s>", "<unk>", "|", "A", "B"], "letter")
    torch.manual_seed(0)
    cpu = build_ctc_model(dataclasses.replace(wav2vec2_tiny_config(), mask_prob=0.0), len(vocab)).eval()
    dev = copy.deepcopy(cpu).to(DEVICE)
    crit = CtcCriterion(vocab)
    batch = {"source": torch.randn(2, 8000), "padding_mask": padding([8000, 6000], 8000),
             "target": torch.tensor([[5, 6, 4, 5], [6, 1, 1, 1]]), "target_lengths": torch.tensor([4, 1])}
    results = []
    for model in (cpu, dev):
        d = next(model.parameters()).device
        out = crit(model, {k: v.to(d) for k, v in batch.items()})
        out.loss.backward()
        results.append((out.loss, out.sample_size, model.proj.weight.grad))
    for a, b in zip(*results):
        close(a, b, 1e-3)


# --------------------------------------------------------------------------------------------------
# trainer, resume, compile
# --------------------------------------------------------------------------------------------------


def _trainer(seed=0, **cfg):
    torch.manual_seed(seed)
    mcfg = wav2vec2_tiny_config()
    return Trainer(toy_config(**{"common.device": DEVICE.type, **cfg}), build_model(mcfg),
                   build_objective(CriterionConfig(), mcfg), DistEnv(device=DEVICE))


def _batches(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"source": torch.randn(2, 6000, generator=g), "padding_mask": padding([6000, 5000], 6000),
             "audio_samples": 11000} for _ in range(n)]


@pytest.mark.parametrize("precision", ["fp32", "bf16"] + (["fp16"] if CUDA else []))
def test_trainer_steps_and_resumes_on_device(precision):
    cfg = {"common.bf16": precision == "bf16", "common.fp16": precision == "fp16"}
    a = _trainer(**cfg)
    for i in range(2):
        stats = a.train_step(_batches(2, seed=i))
        assert not stats["skipped"] and stats["nsentences"] == 4
    b = _trainer(seed=5, **cfg)
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    assert b.num_updates == 2 and (precision != "fp16" or b.scaler.get_scale() == a.scaler.get_scale())
    sa, sb = a.train_step(_batches(2, seed=7)), b.train_step(_batches(2, seed=7))
    assert sa["loss"] == pytest.approx(sb["loss"], rel=1e-4)
    for (k, x), y in zip(state_of(a.model).items(), state_of(b.model).values()):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.skipif(not CUDA, reason="inductor on the CPU takes minutes; tests/test_cuda_readiness.py traces on the CPU")
def test_compiled_layers_on_device_match_eager():
    torch.manual_seed(0)
    cfg = dataclasses.replace(wav2vec2_tiny_config(), dropout=0.0, attention_dropout=0.0)
    eager = build_model(cfg).to(DEVICE).eval()
    compiled = copy.deepcopy(eager)
    compile_transformer_layers(compiled)
    for T in (8000, 9920):
        source = torch.randn(2, T, device=DEVICE)
        close(eager(source, mask=False, features_only=True)["x"], compiled(source, mask=False, features_only=True)["x"],
              1e-3)


# --------------------------------------------------------------------------------------------------
# k-means, interop
# --------------------------------------------------------------------------------------------------


def test_kmeans_on_device_equals_cpu_quality():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(12, 16, generator=g) * 4
    x = centres[torch.randint(0, 12, (3000,), generator=g)] + torch.randn(3000, 16, generator=g)
    fits = [fit_kmeans(x, KMeansSettings(k=12, device=d, seed=0, precision="fp32")) for d in ("cpu", DEVICE.type)]
    x64 = x.double()
    a, b = (inertia(x64, f.centroids.double()) for f in fits)
    assert b <= a * 1.02
    labels_dev, _ = nearest_centroids(x.to(DEVICE), fits[0].centroids.to(DEVICE))
    labels_cpu, _ = nearest_centroids(x, fits[0].centroids)
    assert (labels_dev.cpu() == labels_cpu).float().mean() > 0.999


def test_exported_model_runs_in_transformers_on_device(tmp_path):
    transformers = pytest.importorskip("transformers")
    from speechssl.cli import main
    from test_interop_common import features, padded_batch, save_model, tiny_model

    model = tiny_model("wav2vec2")
    ckpt = save_model(tmp_path / "m.pt", model)
    assert main(["export", str(ckpt), "--to", "hf", "--out", str(tmp_path / "hf")]) == 0
    hf = transformers.Wav2Vec2Model.from_pretrained(tmp_path / "hf").to(DEVICE).eval()
    source, padding_mask, _ = padded_batch()
    ours = features(model.to(DEVICE), source.to(DEVICE), padding_mask.to(DEVICE))
    with torch.no_grad():
        theirs = hf(source.to(DEVICE), attention_mask=(~padding_mask).long().to(DEVICE)).last_hidden_state
    valid = ~ours["padding_mask"]
    close(ours["x"][valid], theirs[valid], 1e-3)
