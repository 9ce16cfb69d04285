"""CUDA-specific settings checked on the CPU: IEEE fp32 losses under TF32, DDP's unused-parameter search,
``common.compile``, deterministic CTC on CUDA."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from speechssl.config import ConfigError, CriterionConfig
from speechssl.models import build_model, hubert_tiny_config, wav2vec2_tiny_config
from speechssl.models.components import TransformerLayer, compile_transformer_layers
from speechssl.objectives import build_objective, contrastive_logits, sample_negatives
from speechssl.train.distributed import DistEnv
from speechssl.train.trainer import Trainer
from speechssl.utils.device import fp32_matmul
from train_fixtures import toy_config

pytestmark = pytest.mark.usefixtures("one_thread")


class _TF32AtMatmuls(TorchDispatchMode):
    """Records ``allow_tf32`` at every matrix product (name -> list of flags)."""

    def __init__(self):
        super().__init__()
        self.seen: dict[str, list[bool]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in ("mm", "bmm", "addmm", "baddbmm", "matmul"):
            self.seen.setdefault(name, []).append(torch.backends.cuda.matmul.allow_tf32)
        return func(*args, **(kwargs or {}))


@pytest.fixture
def tf32_on():
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


def test_loss_logits_never_run_in_tf32(tf32_on):
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(2, 12, 8, generator=g, requires_grad=True)
    targets = torch.randn(2, 12, 8, generator=g, requires_grad=True)
    neg = sample_negatives(2, 12, 5, generator=g)
    with _TF32AtMatmuls() as mode:
        logits = contrastive_logits(pred, targets, neg, 0.1)
        logits.masked_fill(logits.isinf(), 0).sum().backward()
    assert mode.seen["bmm"] and not any(mode.seen["bmm"])  # forward and both backward products
    assert len(mode.seen["bmm"]) == 3

    model = build_model(hubert_tiny_config())
    proj = torch.randn(7, 16, generator=g, requires_grad=True)
    with _TF32AtMatmuls() as mode:
        model.label_logits(proj, 0).sum().backward()
    assert len(mode.seen["mm"]) == 3 and not any(mode.seen["mm"])
    assert model.label_embs_concat.grad is not None and proj.grad is not None

    quantizer = build_model(wav2vec2_tiny_config()).quantizer.train()
    x = torch.randn(20, 32, generator=g)
    with _TF32AtMatmuls() as mode:
        quantizer(x)["x"].sum().backward()
    assert len(mode.seen["bmm"]) == 2 and not any(mode.seen["bmm"])  # the straight-through backward
    assert torch.backends.cuda.matmul.allow_tf32  # restored


def test_fp32_matmul_is_a_plain_matmul():
    g = torch.Generator().manual_seed(0)
    for a_shape, b_shape in (((5, 3), (3, 4)), ((2, 5, 3), (2, 3, 4))):
        a = torch.randn(a_shape, generator=g, requires_grad=True)
        b = torch.randn(b_shape, generator=g, requires_grad=True)
        out = fp32_matmul(a, b)
        grad = torch.randn(out.shape, generator=g)
        ga, gb = torch.autograd.grad(out, (a, b), grad)
        ref = torch.matmul(a, b)
        assert torch.equal(out, ref)
        ra, rb = torch.autograd.grad(ref, (a, b), grad)
        torch.testing.assert_close(ga, ra, rtol=0, atol=0)
        torch.testing.assert_close(gb, rb, rtol=0, atol=0)
    with pytest.raises(ValueError, match="fp32_matmul"):
        fp32_matmul(torch.ones(2, 3, 4), torch.ones(4, 2))


# --------------------------------------------------------------------------------------------------
# DDP: find_unused_parameters exactly when a step can leave a parameter without gradient
# --------------------------------------------------------------------------------------------------


def _params_without_grad(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n for n, p in model.named_parameters() if p.requires_grad and p.grad is None}


def _pretrain_cfg(model_cfg, **distributed):
    cfg = toy_config()
    cfg.model = model_cfg
    cfg.distributed_training = dataclasses.replace(cfg.distributed_training, **distributed)
    return cfg


@pytest.mark.parametrize("changes,unused", [
    ({}, False),
    ({"feature_grad_mult": 0.0}, True),
    ({"extractor_mode": "fbank", "conv_feature_layers": [], "feature_grad_mult": 0.0}, False),
    ({"encoder_layerdrop": 0.05}, True),
])
def test_pretraining_looks_for_unused_parameters_only_when_there_can_be_some(changes, unused):
    from speechssl.tasks.pretraining import may_leave_parameters_unused

    torch.manual_seed(0)
    mcfg = dataclasses.replace(wav2vec2_tiny_config(), **changes)
    assert may_leave_parameters_unused(_pretrain_cfg(mcfg)) == unused
    assert may_leave_parameters_unused(_pretrain_cfg(mcfg, find_unused_parameters=True))
    if mcfg.encoder_layerdrop == 0:  # deterministic: the step uses every parameter unless flagged
        model = build_model(mcfg).train()
        out = build_objective(CriterionConfig(), mcfg)(model, {"source": torch.randn(2, 8000)})
        missing = _params_without_grad(model, out.loss)
        assert bool(missing) == unused, missing
        if missing:
            assert all(n.startswith("feature_extractor.") for n in missing)


@pytest.mark.parametrize("changes,unused", [
    ({}, False),
    ({"apply_mask": False}, True),
    ({"mask_prob": 0.0}, True),
    ({"freeze_finetune_updates": 10}, True),
    ({"encoder_layerdrop": 0.1}, True),
])
def test_ctc_looks_for_unused_parameters_only_when_there_can_be_some(changes, unused):
    from speechssl.models.ctc import build_ctc_model
    from speechssl.tasks.ctc import may_leave_parameters_unused

    torch.manual_seed(0)
    mcfg = dataclasses.replace(wav2vec2_tiny_config(), **{"feature_grad_mult": 0.0, "mask_prob": 0.3,
                                                          "apply_mask": True, **changes})
    assert may_leave_parameters_unused(mcfg) == unused
    if mcfg.encoder_layerdrop == 0:
        model = build_ctc_model(mcfg, 7).train()
        missing = _params_without_grad(model, model(torch.randn(2, 8000))["logits"].float().pow(2).sum())
        assert bool(missing) == unused, missing


def test_deterministic_ctc_is_refused_on_cuda(monkeypatch):
    from speechssl.tasks.ctc import check_deterministic
    from speechssl.train import distributed

    cfg = toy_config(**{"common.deterministic": True})
    check_deterministic(cfg)  # CPU: fine
    monkeypatch.setattr(distributed, "select_device", lambda common, local_rank=0: torch.device("cuda"))
    with pytest.raises(ConfigError, match="no deterministic CUDA backward"):
        check_deterministic(cfg)
    check_deterministic(toy_config(**{"common.deterministic": False}))


# --------------------------------------------------------------------------------------------------
# common.compile
# --------------------------------------------------------------------------------------------------


def test_compile_setting_compiles_each_transformer_layer_in_place():
    cfg = wav2vec2_tiny_config()
    model = build_model(cfg)
    keys = list(model.state_dict())
    trainer = Trainer(toy_config(**{"common.compile": True}), model, build_objective(CriterionConfig(), cfg),
                      DistEnv())
    layers = [m for m in trainer.model.modules() if isinstance(m, TransformerLayer)]
    assert len(layers) == cfg.encoder_layers and all(m._compiled_call_impl is not None for m in layers)
    assert list(trainer.model.state_dict()) == keys
    assert trainer.model.feature_extractor._compiled_call_impl is None  # the rest stays eager
    plain = Trainer(toy_config(), build_model(cfg), build_objective(CriterionConfig(), cfg), DistEnv())
    assert all(m._compiled_call_impl is None for m in plain.model.modules())


def test_compiled_layers_trace_and_compute_the_same():
    """dynamo traces the layers (eager backend: no code generation on the CPU test machine), for two
    lengths and with a padding mask, and the outputs and gradients are those of the eager layers."""
    torch.manual_seed(0)
    model = build_model(dataclasses.replace(wav2vec2_tiny_config(), dropout=0.0, attention_dropout=0.0)).eval()
    compiled = build_model(dataclasses.replace(wav2vec2_tiny_config(), dropout=0.0, attention_dropout=0.0)).eval()
    compiled.load_state_dict(model.state_dict())
    assert compile_transformer_layers(compiled, backend="eager") == 2
    for T, lengths in ((8000, None), (9600, [9600, 7000])):
        source = torch.randn(2, T)
        pad = None if lengths is None else torch.arange(T)[None] >= torch.tensor(lengths)[:, None]
        outs = []
        for m in (model, compiled):
            m.zero_grad()
            x = m(source, pad, mask=False, features_only=True)["x"]
            x.pow(2).sum().backward()
            outs.append((x, m.encoder.layers[0].fc1.weight.grad.clone()))
        torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(outs[0][1], outs[1][1], rtol=1e-4, atol=1e-5)
