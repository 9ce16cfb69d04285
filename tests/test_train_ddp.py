"""Two gloo processes (DDP) give the same parameters as one process with the same global batch.

The 2-process run takes one micro-batch per rank per update; the 1-process run takes both micro-batches
with optimization.update_freq=2. The data (rank r gets global batches r, r+2, ...), the per-micro-batch
seeds (dropout, masks, negatives depend on (seed, update, global micro-batch index), not on the process)
and the fairseq gradient normalization (sum over all frames / all-reduced sample size) make the two
runs compute the same update, so parameters agree to float rounding after several updates, validation
losses too. The tiny model keeps dropout 0.1, masking and negative sampling on, so a per-rank RNG
mix-up or a wrong gradient scale (e.g. a mean of per-rank means) shows as a mismatch.
"""

import json
import subprocess
import sys

import pytest

from test_data2vec2 import d2v_recipe
from train_fixtures import assert_states_equal, load_model_state, make_corpus, tiny_recipe


def records(run, split):
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["split"] == split]


@pytest.mark.parametrize("model", ["wav2vec2", "data2vec2"])
def test_two_gloo_processes_equal_one_process_with_update_freq_2(tmp_path, model):
    """data2vec 2.0: every rank takes the same EMA step after the same update, so the teachers agree too."""
    # 16 equal utterances, 2 per batch: 8 batches per epoch, 4 updates per epoch in both layouts
    man = make_corpus(tmp_path, {"train": [12000] * 16, "valid": [12000] * 3})
    make = tiny_recipe if model == "wav2vec2" else lambda path, **kw: d2v_recipe(path, man, **kw)
    recipe = make(tmp_path / "tiny.yaml", optimization={"max_update": 6},
                  checkpoint={"save_interval_updates": 3}, common={"log_interval": 1})
    base = [sys.executable, "-m", "speechssl", "pretrain", str(recipe), f"task.data={man}"]
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run(base + [f"checkpoint.save_dir={one}", "optimization.update_freq=2"], check=True,
                   capture_output=True)
    res = subprocess.run(base + [f"checkpoint.save_dir={two}", "distributed_training.nproc=2"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "2 process(es)" in res.stdout

    assert_states_equal(load_model_state(one / "checkpoint_last.pt"), load_model_state(two / "checkpoint_last.pt"),
                        atol=1e-5)
    t1, t2 = records(one, "train"), records(two, "train")
    assert [r["update"] for r in t2] == list(range(1, 7))  # rank 0 alone logs: no duplicate records
    for a, b in zip(t1, t2):
        assert abs(a["loss"] - b["loss"]) < 1e-4 and a["sample_size"] == b["sample_size"]
        assert abs(a["grad_norm"] - b["grad_norm"]) < 1e-4 * a["grad_norm"]  # same gradient scale
    v1, v2 = records(one, "valid"), records(two, "valid")
    assert len(v1) == len(v2) == 3 and all(abs(a["loss"] - b["loss"]) < 1e-4 for a, b in zip(v1, v2))
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())


EXIT_RACE = '''
import sys
import torch
import torch.distributed as dist
from speechssl.config import CommonConfig, DistributedTrainingConfig
from speechssl.train import distributed


def worker():
    distributed.init_distributed(CommonConfig(device="cpu"), DistributedTrainingConfig())
    ddp = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(3, 3))  # keeps the gloo group alive
    t = torch.ones(300_000)
    dist.all_reduce(t, async_op=True)  # still in a gloo worker thread when the rank leaves
    del t, ddp
    distributed.cleanup()


if __name__ == "__main__":
    for _ in range(int(sys.argv[1])):
        distributed.spawn(worker, 2)
    print("all ranks exited cleanly")
'''


def test_finished_ranks_leave_without_the_gloo_exit_crash(tmp_path):
    """A gloo worker thread that frees a Python tensor during interpreter finalization aborts its process.

    DDP keeps the gloo group (and its threads) alive past destroy_process_group; a tensor still held by
    the group's last work is freed by a gloo thread, which takes the GIL. During interpreter finalization
    that aborts with "terminate called without an active exception" (6 runs of 10 before the fix); the
    spawned ranks now leave through distributed.exit_worker, without finalization.
    """
    script = tmp_path / "exit_race.py"
    script.write_text(EXIT_RACE)
    res = subprocess.run([sys.executable, str(script), "4"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "all ranks exited cleanly" in res.stdout, res.stderr[-2000:]
    assert "terminate called" not in res.stderr


def test_exit_worker_flushes_what_the_rank_printed(tmp_path):
    code = ("import sys\nfrom speechssl.train import distributed\nprint('last words', end='')\n"
            "sys.stderr.write('to stderr')\ndistributed.exit_worker(3)\nprint('never')")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert (res.returncode, res.stdout, res.stderr) == (3, "last words", "to stderr")
