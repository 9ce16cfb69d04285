"""Exact resume: a run killed with SIGKILL after a checkpoint, then resumed by re-running the same command,
ends with bit-identical parameters to an uninterrupted run (CPU, common.deterministic=true)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from speechssl.cli import main
from speechssl.train.checkpoint import load_checkpoint
from train_fixtures import assert_states_equal, load_model_state, make_corpus, tiny_recipe

LENGTHS = [8000 + 211 * i for i in range(20)]


def cli(*args):
    return [sys.executable, "-m", "speechssl", "pretrain", *map(str, args)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    man = make_corpus(tmp, {"train": LENGTHS, "valid": [9000, 10000]})
    recipe = tiny_recipe(tmp / "tiny.yaml", common={"deterministic": True, "log_interval": 5},
                         dataset={"num_workers": 1, "max_tokens": 24000},
                         optimization={"max_update": 16},
                         checkpoint={"save_interval_updates": 4, "keep_interval_updates": 1})
    return tmp, cli(recipe, f"task.data={man}")


@pytest.fixture(scope="module")
def d2v_setup(tmp_path_factory):
    """The same corpus and schedule with the tiny data2vec 2.0 (student, decoder, EMA teacher)."""
    from test_data2vec2 import d2v_recipe

    tmp = tmp_path_factory.mktemp("resume_d2v")
    man = make_corpus(tmp, {"train": LENGTHS, "valid": [9000, 10000]})
    recipe = d2v_recipe(tmp / "d2v.yaml", man, common={"deterministic": True, "log_interval": 5},
                        dataset={"num_workers": 1, "max_tokens": 24000},
                        optimization={"max_update": 16},
                        checkpoint={"save_interval_updates": 4, "keep_interval_updates": 1})
    return tmp, cli(recipe)


def test_sigkill_then_resume_is_exact(setup):
    kill_and_resume(*setup)


def test_data2vec2_sigkill_then_resume_is_exact_with_the_teacher(d2v_setup):
    tmp, _ = d2v_setup
    kill_and_resume(*d2v_setup)
    final = load_model_state(tmp / "killed" / "checkpoint_last.pt")
    teacher = [k for k in final if k.startswith("teacher.")]
    assert teacher and any(not torch.equal(final[k], final["encoder." + k[len("teacher."):]]) for k in teacher)


def kill_and_resume(tmp, cmd):
    """Run ``cmd`` to the end in ``tmp/full``; run it again in ``tmp/killed``, SIGKILL it after its first
    checkpoint, re-run it there: the final weights (everything in the state dict) must be bit-identical."""
    full, killed = tmp / "full", tmp / "killed"
    subprocess.run(cmd + [f"checkpoint.save_dir={full}"], check=True, capture_output=True, text=True)

    proc = subprocess.Popen(cmd + [f"checkpoint.save_dir={killed}"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    written = lambda: list(killed.glob("checkpoint_*_4.pt")) and (killed / "checkpoint_last.pt").exists()  # noqa
    while not written() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    stopped_at = load_checkpoint(killed / "checkpoint_last.pt")["num_updates"]
    assert 4 <= stopped_at < 16, "the run was not killed mid-way"

    res = subprocess.run(cmd + [f"checkpoint.save_dir={killed}"], check=True, capture_output=True, text=True)
    assert f"at update {stopped_at} " in res.stdout and "resumed from" in res.stdout
    assert_states_equal(load_model_state(full / "checkpoint_last.pt"), load_model_state(killed / "checkpoint_last.pt"))
    # metrics.jsonl has no duplicate records from the killed run
    updates = [json.loads(x)["update"] for x in (killed / "metrics.jsonl").read_text().splitlines()
               if json.loads(x)["split"] == "train"]
    assert updates == sorted(set(updates)) and updates[-1] == 16


def test_rerun_of_finished_run_and_restart_rules(setup, capsys):
    tmp, cmd = setup
    run = tmp / "again"
    recipe, data = cmd[-2], cmd[-1]  # in-process: common.deterministic stays off in the test process
    args = ["pretrain", recipe, data, f"checkpoint.save_dir={run}", "optimization.max_update=4",
            "common.deterministic=false", "dataset.num_workers=0"]
    assert main(args) == 0
    capsys.readouterr()
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "resumed from" in out and "at update 4 " in out and "nothing to do" in out
    assert main(args + ["--restart"]) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--force" in err
    assert main(args + ["model.encoder_layers=3"]) == 2
    assert "model.encoder_layers: checkpoint 2, now 3" in capsys.readouterr().err
    assert main(args + ["--restart", "--force"]) == 0
    out = capsys.readouterr().out
    assert "resumed" not in out and "update      4" in out
    assert load_checkpoint(run / "checkpoint_last.pt")["num_updates"] == 4
