"""Trainer: fairseq gradient normalization, accumulation, clipping, non-finite skipping/abort, precision."""

import copy

import pytest
import torch

from speechssl.train.distributed import DistEnv
from speechssl.train.trainer import NonFiniteError, Trainer, micro_batch_seed, seed_everything
from train_fixtures import ToyModel, ToyObjective, state_of, toy_batch, toy_config


def make(seed=0, objective=None, **cfg):
    torch.manual_seed(seed)
    model = ToyModel()
    return Trainer(toy_config(**cfg), model, objective or ToyObjective(), DistEnv())


def capture_grads(trainer):
    """Record the gradients the optimizer steps with."""
    seen = []
    step = trainer.optimizer.step

    def wrapped(*a, **k):
        seen.append({n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None})
        return step(*a, **k)

    trainer.optimizer.step = wrapped
    return seen


def test_gradients_are_sum_over_frames_divided_by_total_sample_size():
    trainer = make()
    seen = capture_grads(trainer)
    ref = ToyModel()
    ref.load_state_dict(trainer.model.state_dict())
    batches = [toy_batch(2, 1600, seed=1), toy_batch(3, 800, seed=2)]
    stats = trainer.train_step(batches)
    # reference: same RNG per micro-batch, sum of losses, one division by the total number of frames
    obj, total, frames = ToyObjective(), 0.0, 0
    for j, b in enumerate(batches):
        seed_everything(micro_batch_seed(5, 0, j))
        out = obj(ref, b)
        total = total + out.loss
        frames += int(out.sample_size)
    (total / frames).backward()
    assert stats["sample_size"] == frames and stats["loss"] == pytest.approx(total.item() / frames, rel=1e-5)
    for n, p in ref.named_parameters():
        torch.testing.assert_close(seen[0][n], p.grad, rtol=1e-5, atol=1e-7)
    assert stats["nsentences"] == 5 and stats["audio_samples"] == 2 * 1600 + 3 * 800
    assert stats["num_masked"] == frames  # counts are summed, not averaged
    assert trainer.num_updates == 1 and trainer.model.num_updates_seen[-1] == 1


def test_clip_norm_and_reported_norm():
    trainer = make(**{"optimization.clip_norm": 1e-3})
    seen = capture_grads(trainer)
    stats = trainer.train_step([toy_batch()])
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in seen[0].values()]))
    assert stats["grad_norm"] > 1e-3
    assert norm.item() == pytest.approx(1e-3, rel=1e-3)


def test_same_seed_same_updates():
    a, b = make(seed=1), make(seed=1)
    for i in range(3):
        a.train_step([toy_batch(seed=i)])
        b.train_step([toy_batch(seed=i)])
    assert all(torch.equal(x, y) for x, y in zip(state_of(a.model).values(), state_of(b.model).values()))


def test_nonfinite_loss_is_skipped_counted_and_training_continues():
    trainer = make(objective=ToyObjective(nan_at=[1]))
    trainer.train_step([toy_batch(seed=0)])
    before = state_of(trainer.model)
    stats = trainer.train_step([toy_batch(seed=1)])
    assert stats["skipped"] and stats["nonfinite"] == "loss"
    assert trainer.num_updates == 1 and trainer.nonfinite_total == 1
    assert all(torch.equal(before[k], v) for k, v in state_of(trainer.model).items())
    stats = trainer.train_step([toy_batch(seed=2)])
    assert not stats["skipped"] and trainer.num_updates == 2 and trainer.nonfinite_streak == 0
    assert trainer.state_dict()["nonfinite_total"] == 1


def test_nonfinite_gradient_is_skipped():
    trainer = make()
    handle = trainer.model.proj.weight.register_hook(lambda g: g * float("inf"))
    stats = trainer.train_step([toy_batch()])
    handle.remove()
    assert stats["skipped"] and stats["nonfinite"] == "gradient" and trainer.num_updates == 0
    assert all(p.grad is None for p in trainer.model.parameters())


def test_abort_after_consecutive_nonfinite():
    trainer = make(objective=ToyObjective(nan_at=range(100)), **{"optimization.max_consecutive_nonfinite": 3})
    trainer.train_step([toy_batch()])
    trainer.train_step([toy_batch()])
    with pytest.raises(NonFiniteError, match="3 consecutive updates had a non-finite loss"):
        trainer.train_step([toy_batch()])


def test_bf16_autocast_on_cpu_and_fp16_fallback():
    trainer = make(**{"common.bf16": True})
    assert trainer.amp_dtype == torch.bfloat16
    stats = trainer.train_step([toy_batch()])
    assert not stats["skipped"] and torch.isfinite(torch.tensor(stats["loss"]))
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    with pytest.warns(UserWarning, match="fp16 needs CUDA"):
        assert make(**{"common.fp16": True}).amp_dtype == torch.bfloat16


def test_state_dict_roundtrip_continues_identically():
    a = make(seed=2)
    a.train_step([toy_batch(seed=0)])
    b = make(seed=9)
    b.load_state_dict(copy.deepcopy(a.state_dict()))  # as from a file: no shared optimizer tensors
    assert b.num_updates == 1 and b.model.num_updates_seen[-1] == 1
    a.train_step([toy_batch(seed=1)])
    b.train_step([toy_batch(seed=1)])
    assert all(torch.equal(x, y) for x, y in zip(state_of(a.model).values(), state_of(b.model).values()))
