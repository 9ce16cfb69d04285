"""Checkpoints: weights_only loading, atomic writes under failure, fairseq names and rotation, RNG, config checks."""

import random

import numpy as np
import pytest
import torch

from speechssl.config import ConfigError, load_config
from speechssl.train import checkpoint as ckpt
from speechssl.train.distributed import DistEnv
from speechssl.train.trainer import Trainer
from train_fixtures import ToyModel, ToyObjective, toy_batch, toy_config


def trained_state():
    trainer = Trainer(toy_config(), ToyModel(), ToyObjective(), DistEnv())
    trainer.train_step([toy_batch()])
    return {**trainer.state_dict(), "epoch": 1, "batch_offset": 1, "rng": [ckpt.rng_state()],
            "config": toy_config().to_dict(), "best": None}


def test_weights_only_roundtrip(tmp_path):
    state = trained_state()
    ckpt.save_checkpoint(state, tmp_path / "c.pt")
    back = torch.load(tmp_path / "c.pt", weights_only=True)
    assert back["num_updates"] == 1 and back["config"]["optimization"]["lr"] == 0.01
    assert torch.equal(back["model"]["proj.weight"], state["model"]["proj.weight"])
    assert back["optimizer"]["state"]


def test_rng_state_roundtrip():
    state = ckpt.rng_state()
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    ckpt.set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a


def test_crash_while_writing_keeps_previous_checkpoint(tmp_path, monkeypatch):
    cfg = load_config(None, [f"checkpoint.save_dir={tmp_path}", "checkpoint.save_interval_updates=2"])
    mgr = ckpt.CheckpointManager(cfg.checkpoint)
    state = trained_state()
    mgr.save(state, epoch=1, num_updates=2, end_of_epoch=False, is_best=False)
    good = (tmp_path / "checkpoint_last.pt").read_bytes()

    def dying_save(obj, fh):
        fh.write(b"partial garbage")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(ckpt.torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        mgr.save(state, epoch=1, num_updates=4, end_of_epoch=False, is_best=False)
    assert (tmp_path / "checkpoint_last.pt").read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_1_2.pt", "checkpoint_last.pt"]
    assert ckpt.load_checkpoint(tmp_path / "checkpoint_last.pt")["num_updates"] == 1


def test_names_rotation_best_and_last(tmp_path):
    cfg = load_config(None, [f"checkpoint.save_dir={tmp_path}", "checkpoint.save_interval_updates=3",
                             "checkpoint.keep_interval_updates=2"])
    mgr = ckpt.CheckpointManager(cfg.checkpoint)
    state = trained_state()
    for n in (3, 6, 9):
        state["num_updates"] = n
        mgr.save(state, epoch=1, num_updates=n, end_of_epoch=False, is_best=n == 6)
    state["num_updates"] = 10
    mgr.save(state, epoch=2, num_updates=10, end_of_epoch=True, is_best=False)
    names = sorted(p.name for p in tmp_path.iterdir())
    # update 3 rotated out (keep 2); the end-of-epoch save is named by epoch
    assert names == ["checkpoint2.pt", "checkpoint_1_6.pt", "checkpoint_1_9.pt", "checkpoint_best.pt",
                     "checkpoint_last.pt"]
    assert ckpt.load_checkpoint(tmp_path / "checkpoint_best.pt")["num_updates"] == 6
    assert ckpt.load_checkpoint(tmp_path / "checkpoint_last.pt")["num_updates"] == 10
    assert ckpt.load_checkpoint(tmp_path / "checkpoint_1_9.pt")["num_updates"] == 9


def test_no_epoch_checkpoints_and_keep_last_epochs(tmp_path):
    cfg = load_config(None, [f"checkpoint.save_dir={tmp_path}", "checkpoint.keep_last_epochs=1"])
    mgr = ckpt.CheckpointManager(cfg.checkpoint)
    for e in (1, 2, 3):
        mgr.save(trained_state(), epoch=e, num_updates=e, end_of_epoch=True, is_best=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint3.pt", "checkpoint_last.pt"]
    cfg = load_config(None, [f"checkpoint.save_dir={tmp_path / 'b'}", "checkpoint.no_epoch_checkpoints=true"])
    ckpt.CheckpointManager(cfg.checkpoint).save(trained_state(), 1, 1, end_of_epoch=True, is_best=False)
    assert [p.name for p in (tmp_path / "b").iterdir()] == ["checkpoint_last.pt"]


def test_resume_config_check_names_model_keys(tmp_path):
    saved = {"config": toy_config().to_dict()}
    now = toy_config(**{"model.encoder_layers": 3, "model.final_dim": 64, "optimization.max_update": 500})
    with pytest.raises(ConfigError, match=r"model.encoder_layers: checkpoint 12, now 3[\s\S]*model.final_dim"):
        ckpt.check_resume_config(now, saved, tmp_path / "c.pt", ("model",))
    changed = ckpt.check_resume_config(toy_config(**{"optimization.max_update": 500}), saved, tmp_path, ("model",))
    assert changed == ["optimization.max_update: checkpoint 100, now 500"]
