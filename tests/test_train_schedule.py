"""LR schedules at their key points (fairseq semantics) and the weight-decay parameter groups."""

import math

import pytest
import torch
from torch import nn

from speechssl.config import ConfigError, OptimizerConfig, load_config
from speechssl.config_check import warnings as config_warnings
from speechssl.train.lr_scheduler import build_lr_schedule
from speechssl.train.optim import build_optimizer, param_groups


def sched(*overrides):
    return build_lr_schedule(load_config(None, ["optimization.lr=1.0", "optimization.max_update=100", *overrides]))


def test_polynomial_decay():
    s = sched("lr_scheduler.name=polynomial_decay", "lr_scheduler.warmup_updates=10")
    assert s(0) == 0.0  # fairseq: step_update(0) before the first update
    assert s(5) == pytest.approx(0.5)
    assert s(10) == pytest.approx(1.0)
    assert s(55) == pytest.approx(0.5)
    assert s(100) == 0.0 and s(150) == 0.0
    s = sched("lr_scheduler.warmup_updates=10", "lr_scheduler.power=2", "lr_scheduler.end_learning_rate=0.1")
    assert s(55) == pytest.approx(0.9 * 0.25 + 0.1)
    assert s(100) == pytest.approx(0.1)
    s = sched("lr_scheduler.warmup_updates=0", "lr_scheduler.total_num_update=200")
    assert s(0) == 1.0 and s(100) == pytest.approx(0.5)


def test_tri_stage():
    s = sched("lr_scheduler.name=tri_stage", "lr_scheduler.phase_ratio=[0.1,0.4,0.5]",
              "lr_scheduler.init_lr_scale=0.01", "lr_scheduler.final_lr_scale=0.05")
    assert s(0) == pytest.approx(0.01)
    assert s(5) == pytest.approx(0.01 + 0.99 * 0.5)
    assert s(10) == 1.0 and s(49) == 1.0
    assert s(75) == pytest.approx(math.exp(math.log(0.05) * 25 / 50))
    assert s(100) == pytest.approx(0.05)
    assert s(130) == pytest.approx(0.05)


def test_cosine_and_fixed():
    s = sched("lr_scheduler.name=cosine", "lr_scheduler.warmup_updates=10", "lr_scheduler.min_lr=0.1")
    assert s(0) == 0.0 and s(5) == pytest.approx(0.5)
    assert s(10) == pytest.approx(1.0)
    assert s(55) == pytest.approx(0.55)
    assert s(100) == pytest.approx(0.1)
    s = sched("lr_scheduler.name=fixed", "lr_scheduler.warmup_updates=4")
    assert [s(n) for n in range(5)] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])


def test_schedule_errors():
    with pytest.raises(ConfigError, match="phase_ratio must be set"):
        sched("lr_scheduler.name=tri_stage")
    with pytest.raises(ConfigError, match="must sum to 1"):
        sched("lr_scheduler.name=tri_stage", "lr_scheduler.phase_ratio=[0.1,0.4,0.4]")
    with pytest.raises(ConfigError, match="lr_scheduler.name=linear: must be one of polynomial_decay"):
        sched("lr_scheduler.name=linear")
    with pytest.raises(ConfigError, match="optimization.max_update"):
        build_lr_schedule(load_config(None, ["lr_scheduler.name=polynomial_decay"]))


def test_warmup_longer_than_the_run_is_cut_short_with_a_warning():
    # fairseq runs it: the learning rate climbs for the whole run and never reaches its peak
    s = sched("lr_scheduler.warmup_updates=200")
    assert [s(n) for n in (0, 50, 99)] == pytest.approx([0.0, 0.25, 0.495])
    cfg = load_config(None, ["optimization.max_update=100", "lr_scheduler.warmup_updates=200"])
    (warning,) = config_warnings(cfg)
    assert "lr_scheduler.warmup_updates=200 >= 100 updates (optimization.max_update)" in warning
    assert not config_warnings(load_config(None, ["optimization.max_update=300", "lr_scheduler.warmup_updates=200"]))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.utils.parametrizations.weight_norm(nn.Conv1d(4, 4, 3), dim=2)
        self.lin = nn.Linear(4, 4)
        self.ln = nn.LayerNorm(4)
        self.gn = nn.GroupNorm(2, 4)
        self.mask_emb = nn.Parameter(torch.zeros(4))
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)


def test_weight_decay_groups():
    net = Net()
    groups = {g["name"]: g for g in param_groups(net, 0.01)}
    names = {id(p): n for n, p in net.named_parameters()}
    decay = sorted(names[id(p)] for p in groups["matrices"]["params"])
    no_decay = sorted(names[id(p)] for p in groups["scales_biases"]["params"])
    assert decay == ["conv.parametrizations.weight.original1", "lin.weight"]
    assert no_decay == ["conv.bias", "conv.parametrizations.weight.original0", "gn.bias", "gn.weight", "lin.bias",
                        "ln.bias", "ln.weight", "mask_emb"]
    assert groups["matrices"]["weight_decay"] == 0.01 and groups["scales_biases"]["weight_decay"] == 0.0
    opt = build_optimizer(net, load_config(None, []).optimizer, lr=1e-3)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["betas"] == (0.9, 0.98)
    assert opt.defaults["eps"] == 1e-6


def test_decoupled_weight_decay_only_on_matrices():
    net = nn.Linear(3, 3)
    with torch.no_grad():
        net.weight.fill_(1.0)
        net.bias.fill_(1.0)
    opt = build_optimizer(net, load_config(None, ["optimizer.weight_decay=0.5"]).optimizer, lr=0.1)
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    assert torch.allclose(net.weight, torch.full((3, 3), 1 - 0.1 * 0.5))  # lr * wd, decoupled
    assert torch.equal(net.bias, torch.ones(3))
    with pytest.raises(ConfigError, match="unknown optimizer 'sgd'"):
        build_optimizer(net, OptimizerConfig(name="sgd"), lr=0.1)


def test_weight_decay_scope_all_decays_every_parameter_as_fairseqs_adam():
    """optimizer.weight_decay_scope=all: biases, norm affines, mask_emb and the weight-norm magnitude decay
    too, each by fairseq's adam step p -= lr * weight_decay * p (zero gradients: only the decay acts)."""
    net = Net()
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(2.0)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    cfg = load_config(None, ["optimizer.weight_decay=0.5", "optimizer.weight_decay_scope=all"]).optimizer
    opt = build_optimizer(net, cfg, lr=0.1)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.5, 0.5]
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for n, p in net.named_parameters():
        if n.startswith("frozen."):
            assert torch.equal(p, before[n])
        else:  # fairseq/optim/adam.py: p_data_fp32.add_(p_data_fp32, alpha=-weight_decay * lr)
            assert torch.allclose(p, before[n] - 0.5 * 0.1 * before[n]), n
    with pytest.raises(ConfigError, match="weight_decay_scope must be one of matrices, all"):
        build_optimizer(net, OptimizerConfig(weight_decay_scope="most"), lr=0.1)
