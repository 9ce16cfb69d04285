"""data2vec 2.0: the block mask, the model (student, decoder, EMA teacher, targets), the objective, the health
alarm, and the pretraining task through ``speechssl pretrain`` (speechssl/models/data2vec2.py,
speechssl/objectives/data2vec2.py, speechssl/tasks/data2vec2.py)."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F

from speechssl.cli import main
from speechssl.config import CriterionConfig, load_config
from speechssl.models import Data2Vec2Model, build_model, data2vec2_base_config, data2vec2_large_config
from speechssl.models import data2vec2_tiny_config
from speechssl.models.data2vec2 import alibi_slopes
from speechssl.models.masking import block_mask
from speechssl.models.pretrained import remove_pretraining_modules
from speechssl.objectives import Data2Vec2Criterion, build_objective
from speechssl.train.checkpoint import load_checkpoint
from speechssl.train.distributed import DistEnv
from speechssl.train.metrics import HealthMonitor
from speechssl.train.trainer import Trainer
from speechssl.utils.device import count_host_reads
from train_fixtures import make_corpus, tiny_recipe, toy_config

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(seed: int = 0, **overrides) -> Data2Vec2Model:
    torch.manual_seed(seed)
    return Data2Vec2Model(dataclasses.replace(data2vec2_tiny_config(), **overrides))


def source(B: int = 3, T: int = 12000, seed: int = 0) -> torch.Tensor:
    return torch.randn(B, T, generator=torch.Generator().manual_seed(seed))


def perturb(module: torch.nn.Module, scale: float = 0.05, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


# --------------------------------------------------------------------------------------------------
# configurations and masks
# --------------------------------------------------------------------------------------------------


def test_published_configs_and_recipes():
    base, large = data2vec2_base_config(), data2vec2_large_config()
    assert (base.clone_batch, base.mask_prob, base.mask_length, base.decoder_dim, base.average_top_k_layers) == \
        (8, 0.5, 5, 384, 8)
    assert (large.encoder_layers, large.prenet_depth, large.clone_batch, large.ema_end_decay) == (24, 8, 12, 1.0)
    model = build_model(base)
    assert isinstance(model, Data2Vec2Model) and model.encoder.pos_conv.kernel == 19
    student = sum(p.numel() for n, p in model.named_parameters() if not n.startswith(("teacher.", "decoder.")))
    assert 93e6 < student < 95e6  # the 12 x 768 encoder, conv front-end and projection
    assert model.encoder.alibi_scale.shape == (12,) and model.encoder.alibi_scale.requires_grad
    # the recipes are the published configurations
    for recipe, ref in (("data2vec2_base", base), ("data2vec2_large", large)):
        cfg = load_config(recipe, ["task.data=x"])
        assert cfg.model == ref, recipe
        assert (cfg.task.name, cfg.criterion.name, cfg.task.normalize) == ("audio_pretraining", "data2vec2", True)
    cfg = load_config("data2vec2_base", ["task.data=x"])
    assert (cfg.optimization.lr, cfg.lr_scheduler.name, cfg.lr_scheduler.warmup_updates, cfg.dataset.max_tokens) == \
        (0.00075, "cosine", 8000, 1_000_000)


def test_alibi_slopes_are_fairseqs():
    assert alibi_slopes(8) == [2.0 ** -(i + 1) for i in range(8)]
    # 12 heads: the 8 slopes of 8 heads, then every second slope of 16 heads (fairseq's workaround)
    assert alibi_slopes(12) == pytest.approx([2.0 ** -(i + 1) for i in range(8)] + [2.0 ** -(i + 0.5) for i in range(4)])


def test_block_mask_masks_exactly_mask_prob_in_blocks():
    g = torch.Generator().manual_seed(0)
    mask = block_mask((64, 200), 0.5, 5, 0.05, generator=g)
    assert mask.dtype == torch.bool and (mask.sum(1) == 100).all()
    # masked frames come in runs (blocks of 5, merged where they overlap), not scattered
    runs = torch.diff(mask.int(), dim=1, prepend=torch.zeros(64, 1, dtype=torch.int)).clamp(min=0).sum()
    assert 100 * 64 / runs > 3.5  # mean run length (a random half of the frames would give ~2)
    assert len({tuple(row.tolist()) for row in mask}) == 64  # every row its own mask
    again = block_mask((64, 200), 0.5, 5, 0.05, generator=torch.Generator().manual_seed(0))
    assert torch.equal(mask, again)
    # length 1: a uniformly random subset of int(L * p) frames
    single = block_mask((2000, 10), 0.3, 1, 0.0, generator=g)
    assert (single.sum(1) == 3).all() and (single.float().mean(0) - 0.3).abs().max() < 0.05


# --------------------------------------------------------------------------------------------------
# teacher, targets, loss
# --------------------------------------------------------------------------------------------------


def test_ema_update_equals_its_formula_and_the_teacher_gets_no_gradient():
    model = tiny(learned_alibi_scale=False)
    perturb(model.encoder)  # the student has moved away from the teacher
    out = Data2Vec2Criterion()(model.train(), {"source": source()})
    out.loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in model.teacher.parameters())
    assert all(p.grad is not None for n, p in model.encoder.named_parameters() if p.requires_grad)
    teacher = {n: p.detach().clone() for n, p in model.teacher.named_parameters()}
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    student = dict(model.encoder.named_parameters())
    model.update_teacher(10)
    d = model.ema_decay_at(10)
    assert d == pytest.approx(0.99999 - (0.99999 - 0.999) * (1 - 10 / 100))  # linear over ema_anneal_end_step
    for n, p in model.teacher.named_parameters():
        if n == "alibi_scale":  # not trained by the student: copied (fairseq's EMAModule)
            assert torch.equal(p, student[n])
        else:
            torch.testing.assert_close(p, d * teacher[n] + (1 - d) * student[n].detach(), rtol=0, atol=1e-7)
    assert model.ema_decay_at(0) == 0.999 and model.ema_decay_at(100) == model.ema_decay_at(10**6) == 0.99999
    frozen = tiny(ema_end_decay=1.0, ema_decay=1.0)
    perturb(frozen.encoder)
    before = [p.clone() for p in frozen.teacher.parameters()]
    frozen.update_teacher(5)  # decay 1: the teacher stays where it is
    assert all(torch.equal(a, b) for a, b in zip(before, frozen.teacher.parameters()))


def test_the_trainer_moves_the_teacher_after_each_update():
    model = tiny()
    trainer = Trainer(toy_config(), model, Data2Vec2Criterion(), DistEnv())
    teacher = [p.detach().clone() for p in model.teacher.parameters()]
    stats = trainer.train_step([{"source": source(2, 8000), "padding_mask": None, "audio_samples": 16000}])
    assert not stats["skipped"] and trainer.num_updates == 1
    d = model.ema_decay_at(1)
    for t_old, t, s in zip(teacher, model.teacher.parameters(), model.encoder.parameters()):
        torch.testing.assert_close(t, d * t_old + (1 - d) * s.detach(), rtol=0, atol=1e-7)
    assert stats["ema_decay"] == pytest.approx(model.ema_decay_at(0))
    assert not model.teacher.training and model.training  # the teacher stays in eval mode


def instance_norm(t: torch.Tensor) -> torch.Tensor:
    """(B, L, D): every channel of every utterance to zero mean and unit variance over time (eps 1e-5)."""
    mean, var = t.mean(dim=1, keepdim=True), t.var(dim=1, unbiased=False, keepdim=True)
    return (t - mean) / torch.sqrt(var + 1e-5)


@pytest.mark.parametrize("norm", ["instance", "layer"])
def test_targets_are_the_mean_of_the_normalised_top_k_teacher_layers(norm):
    flags = dict(instance_norm_target_layer=norm == "instance", layer_norm_target_layer=norm == "layer")
    model = tiny(average_top_k_layers=2, clone_batch=2, **flags).eval()
    perturb(model.teacher, seed=2)  # teacher and student differ
    ffn: dict[int, torch.Tensor] = {}
    hooks = [layer.fc2.register_forward_hook(lambda _m, _i, o, i=i: ffn.__setitem__(i, o))
             for i, layer in enumerate(model.teacher.layers)]
    x = source(2, 12000)
    torch.manual_seed(5)
    with torch.no_grad():
        out = model(x)
    for h in hooks:
        h.remove()
    normed = [instance_norm(ffn[i]) if norm == "instance" else F.layer_norm(ffn[i], ffn[i].shape[-1:]) for i in (1, 2)]
    expected = (normed[0] + normed[1]) / 2  # the top 2 of 3 layers
    mask = out["mask_indices"]
    for row in range(mask.shape[0]):  # row = copy (row % 2) of utterance row // 2
        torch.testing.assert_close(out["targets"][row], expected[row // 2][mask[row]], rtol=1e-5, atol=1e-5)
    # the targets are the teacher's: moving the student changes the predictions, not the targets
    perturb(model.encoder, seed=3)
    torch.manual_seed(5)
    with torch.no_grad():
        again = model(x)
    assert torch.equal(again["mask_indices"], mask)
    torch.testing.assert_close(again["targets"], out["targets"], rtol=0, atol=0)
    assert not torch.allclose(again["pred"], out["pred"])


def test_loss_covers_the_masked_frames_only():
    model = tiny().train()
    decoded = {}

    def keep(_m, _i, output):
        output.retain_grad()
        decoded["out"] = output

    model.decoder.register_forward_hook(keep)
    out = model(source())
    loss = Data2Vec2Criterion().compute(out)
    loss.loss.backward()
    mask = out["mask_indices"]
    grad = decoded["out"].grad  # d loss / d decoder output, (B', L, D)
    assert grad[~mask].abs().max() == 0  # unmasked frames are not scored ...
    assert (grad[mask].abs().sum(-1) > 0).all()  # ... every masked frame is
    B, M, D = out["pred"].shape
    assert loss.sample_size == B * M == int(mask.sum())
    torch.testing.assert_close(loss.loss, ((out["pred"] - out["targets"]) ** 2).sum() / math.sqrt(D))
    torch.testing.assert_close(out["pred"], decoded["out"][mask].view(B, M, D))
    assert loss.logs["target_var"] > 0 and loss.logs["masked_pct"] == pytest.approx(M / mask.shape[1])
    # smooth L1 and an explicit scale (fairseq's loss_beta / loss_scale)
    smooth = Data2Vec2Criterion(loss_beta=0.5, loss_scale=2.0).compute(out)
    ref = F.smooth_l1_loss(out["pred"], out["targets"], reduction="sum", beta=0.5) * 2.0
    torch.testing.assert_close(smooth.loss, ref)


def test_clone_batch_copies_get_different_masks_and_share_one_teacher_pass():
    model = tiny(clone_batch=3).train()
    teacher_rows, student_rows = [], []
    ffn_outputs = model.teacher.ffn_outputs
    model.teacher.ffn_outputs = lambda x, *a: (teacher_rows.append(x.shape[0]), ffn_outputs(x, *a))[1]
    model.encoder.register_forward_pre_hook(lambda _m, args: student_rows.append(args[0].shape[0]))
    out = model(source(2, 12000))
    assert teacher_rows == [2] and student_rows == [6]  # one teacher pass for the 3 copies of 2 utterances
    mask = out["mask_indices"]
    L = mask.shape[1]
    assert (mask.sum(1) == int(L * 0.5)).all()
    for b in range(2):
        copies = [tuple(mask[b * 3 + c].tolist()) for c in range(3)]
        assert len(set(copies)) == 3  # every copy masked differently
        # a frame masked in two copies has the same target in both
        both = mask[b * 3] & mask[b * 3 + 1]
        pos0 = torch.cumsum(mask[b * 3].int(), 0) - 1
        pos1 = torch.cumsum(mask[b * 3 + 1].int(), 0) - 1
        torch.testing.assert_close(out["targets"][b * 3][pos0[both]], out["targets"][b * 3 + 1][pos1[both]])


def test_pretraining_step_reads_nothing_on_the_host():
    model = tiny().train()
    objective = build_objective(CriterionConfig(name="data2vec2"), model.cfg)
    with count_host_reads() as reads:
        out = objective(model, {"source": source()})
        (out.loss / out.sample_size).backward()
    assert {k: v for k, v in reads.items() if v} == {} and isinstance(out.sample_size, int)


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    model = tiny(dropout=0.0, attention_dropout=0.0, decoder_input_dropout=0.0, ema_decay=0.99,
                 ema_end_decay=0.99).train()
    criterion = Data2Vec2Criterion()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = {"source": source(2, 12000)}
    losses = []
    for n in range(150):
        out = criterion(model, batch)
        (out.loss / out.sample_size).backward()
        opt.step()
        opt.zero_grad()
        model.update_teacher(n + 1)
        losses.append(float(out.loss.detach()) / out.sample_size)
    first, last = losses[0], sum(losses[-5:]) / 5
    assert last < 0.15 * first, (first, last)  # measured: 3.9 -> 0.3


# --------------------------------------------------------------------------------------------------
# as an upstream
# --------------------------------------------------------------------------------------------------


def test_features_only_is_the_student_and_padding_rules():
    model = tiny().eval()
    x = source(3, 12000)
    feats = model(x, mask=False, features_only=True)
    assert feats["x"].shape == (3, 37, 48) and len(feats["layer_results"]) == 3 and feats["mask_indices"] is None
    assert model(x, features_only=True, output_layer=1, mask=False)["layer_results"][0].shape == (3, 37, 48)
    remove_pretraining_modules(model)
    assert model.teacher is None and model.decoder is None
    torch.testing.assert_close(model(x, mask=False, features_only=True)["x"], feats["x"], rtol=0, atol=0)
    with pytest.raises(ValueError, match="no teacher"):
        model(x)

    # padding: pos_conv_zero_padding zeroes the padded frames before the positional convolutions (transformers);
    # with one convolution a padded utterance then gets its features alone, fairseq's rule (false) lets the
    # padded frames' features in (and deeper stacks, both ways, see the padding through the first conv's output)
    short = x[1:2, :7000]
    pad = torch.zeros(3, 12000, dtype=torch.bool)
    pad[1, 7000:] = True
    batch = x.clone()
    batch[1, 7000:] = 0.0
    for zero in (True, False):
        one_conv = tiny(conv_pos_depth=1, pos_conv_zero_padding=zero).eval()
        alone = one_conv(short, mask=False, features_only=True)["x"][0]
        padded = one_conv(batch, pad, mask=False, features_only=True)
        n = alone.shape[0]
        assert padded["padding_mask"][1].sum() == 37 - n
        assert torch.allclose(padded["x"][1, :n], alone, rtol=1e-5, atol=1e-5) == zero


def test_fine_tuning_masks_with_noise_and_zeroes_channels():
    model = tiny(mask_prob=0.4, mask_noise_std=0.01, mask_channel_prob=0.3, mask_channel_length=8).train()
    x = torch.full((4, 50, 48), 5.0)
    mask = torch.zeros(4, 50, dtype=torch.bool)
    mask[:, 10:20] = True
    torch.manual_seed(0)
    y = model.apply_mask(x, mask)
    zero_channels = (y == 0).all(dim=1)  # (B, D)
    assert zero_channels.any()
    kept = ~zero_channels[:, None, :].expand_as(y)
    assert (y[~mask][kept[~mask]] == 5.0).all()  # unmasked frames untouched (but their masked channels)
    noise = y[mask][kept[mask]]
    assert noise.abs().max() < 0.1 and 0.005 < noise.std() < 0.02
    out = model(source(), features_only=True)  # random span masks while fine-tuning
    assert out["mask_indices"] is not None and out["mask_indices"].any()


def test_alibi_bias_follows_the_kept_positions_and_its_scale_is_clamped():
    model = tiny()
    enc = model.encoder
    full = enc.attention_bias(torch.arange(20)[None])  # (1, H, 20, 20)
    slopes = torch.tensor(alibi_slopes(4))
    torch.testing.assert_close(full[0, :, 3, 7], -4 * slopes)
    keep = torch.tensor([[0, 2, 3, 9], [1, 4, 5, 19]])
    part = enc.attention_bias(keep)  # fairseq's masked_alibi: the full bias at (kept, kept)
    for b in range(2):
        torch.testing.assert_close(part[b], full[0][:, keep[b]][:, :, keep[b]])
    with torch.no_grad():
        enc.alibi_scale[1] = -3.0
    assert enc.attention_bias(keep)[:, 1].abs().max() == 0  # a negative scale is clamped at 0
    assert tiny(use_alibi_encoder=False).encoder.attention_bias(keep) is None


# --------------------------------------------------------------------------------------------------
# health alarm and the pretraining task
# --------------------------------------------------------------------------------------------------


def test_health_alarm_on_collapsing_variance(tmp_path):
    health = HealthMonitor(min_target_var=0.1, min_pred_var=0.01, variance_start_update=100)
    assert health.check({"update": 50, "target_var": 0.01, "pred_var": 0.001}) == []  # too early
    alarms = health.check({"update": 200, "target_var": 0.05, "pred_var": 0.5})
    assert len(alarms) == 1 and "target_var 0.0500 < 0.1" in alarms[0] and "collapsing" in alarms[0]
    alarms = health.check({"update": 300, "target_var": 0.5, "pred_var": 0.001})
    assert len(alarms) == 1 and "pred_var" in alarms[0]
    assert health.check({"update": 400, "target_var": 0.5, "pred_var": 0.5}) == []
    # the task's monitor: a rising loss is no alarm (the targets gain variance), a collapse is
    from speechssl.pretrain import build_pretraining

    man = make_corpus(tmp_path, {"train": [9000] * 2, "valid": [9000]})
    setup = build_pretraining(load_config(d2v_recipe(tmp_path / "r.yaml", man)))
    assert [setup.health.check({"update": 600 + i, "loss": v}) for i, v in enumerate((2.0, 1.0, 9.0, 9.0))] == [[]] * 4
    assert setup.health.check({"update": 700, "target_var": 0.01})


def d2v_recipe(path, data, **sections):
    """train_fixtures.tiny_recipe on data2vec 2.0's published recipe with its tiny test model."""
    extra = {"task": {"data": str(data), "normalize": False}, "dataset": {"disable_validation": False}}
    for sec, body in sections.items():
        extra.setdefault(sec, {}).update(body)
    return tiny_recipe(path, base="data2vec2_base.yaml", model_config=data2vec2_tiny_config(), **extra)


def test_pretrain_cli_trains_logs_and_checkpoints_the_teacher(tmp_path, capsys):
    man = make_corpus(tmp_path, {"train": [9000 + 300 * i for i in range(12)], "valid": [9000, 11000]})
    recipe = d2v_recipe(tmp_path / "d2v.yaml", man)
    run = tmp_path / "run"
    assert main(["pretrain", str(recipe), f"checkpoint.save_dir={run}"]) == 0
    out = capsys.readouterr().out
    assert "Data2Vec2Model" in out and "teacher: EMA of the student encoder" in out and "2 masked copies" in out
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    assert train and all({"target_var", "pred_var", "ema_decay", "masked_pct"} <= set(r) for r in train)
    assert any(r["split"] == "valid" and "target_var" in r for r in records)
    state = load_checkpoint(run / "checkpoint_last.pt")
    assert state["num_updates"] == 6
    teacher = {k[len("teacher."):]: v for k, v in state["model"].items() if k.startswith("teacher.")}
    student = {k[len("encoder."):]: v for k, v in state["model"].items() if k.startswith("encoder.")}
    assert teacher.keys() == student.keys() and any(not torch.equal(teacher[k], student[k]) for k in teacher)
    # config errors, before any work
    assert main(["pretrain", str(recipe), f"checkpoint.save_dir={run}_x", "task.enable_padding=true"]) == 2
    assert "task.enable_padding=true" in capsys.readouterr().err
    assert main(["pretrain", str(recipe), f"checkpoint.save_dir={run}_x", "criterion.name=wav2vec"]) == 2
    assert "criterion.name=data2vec2" in capsys.readouterr().err
    assert main(["pretrain", str(recipe), f"checkpoint.save_dir={run}_x", "model.average_top_k_layers=4"]) == 2
    assert "model.average_top_k_layers=4" in capsys.readouterr().err
