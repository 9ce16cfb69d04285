"""A lost rank under torchrun: two torchrun agents ("nodes") on localhost, one worker SIGKILLed mid-run.

The agents restart both workers (--max-restarts); the restarted workers must form a new group (torchrun's
shared store still holds the dead workers' keys), resume from checkpoint_last.pt and finish at the same
final update, within seconds, and the survivor's error is one line, not a traceback.
"""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from speechssl.train.checkpoint import load_checkpoint
from train_fixtures import make_corpus, tiny_recipe

MAX_UPDATE, KILL_AT = 60, 16


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def last_update(metrics: Path) -> int:
    if not metrics.exists():
        return 0
    lines = [x for x in metrics.read_text().splitlines() if '"split": "train"' in x]
    return int(lines[-1].split('"update": ')[1].split(",")[0]) if lines else 0


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc to find the worker process")
def test_killed_worker_restarts_resumes_and_finishes(tmp_path):
    man = make_corpus(tmp_path, {"train": [8000 + 211 * i for i in range(20)], "valid": [9000]})
    recipe = tiny_recipe(tmp_path / "tiny.yaml", common={"log_interval": 1},
                         dataset={"num_workers": 0}, optimization={"max_update": MAX_UPDATE},
                         checkpoint={"save_interval_updates": 5, "keep_interval_updates": 1})
    run = tmp_path / "run"
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
           "--max-restarts", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
           "--rdzv-id", f"speechssl-test-{port}", "--monitor-interval", "0.5",
           "-m", "speechssl", "pretrain", str(recipe), f"task.data={man}", f"checkpoint.save_dir={run}"]
    logs = [tmp_path / f"node{i}.log" for i in range(2)]
    agents = [subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env) for log in logs]
    t0 = time.time()
    try:
        while last_update(run / "metrics.jsonl") < KILL_AT:
            assert time.time() - t0 < 120 and all(a.poll() is None for a in agents), logs[0].read_text()[-3000:]
            time.sleep(0.01)
        (worker,) = children(agents[1].pid)
        os.kill(worker, signal.SIGKILL)
        killed_at = last_update(run / "metrics.jsonl")
        for agent in agents:
            agent.wait(timeout=180)
    finally:
        for agent in agents:
            if agent.poll() is None:
                agent.kill()
    out = [log.read_text() for log in logs]
    assert [a.returncode for a in agents] == [0, 0], out[0][-3000:] + out[1][-3000:]
    assert killed_at < MAX_UPDATE, "the run ended before the worker was killed"
    state = load_checkpoint(run / "checkpoint_last.pt")
    assert state["num_updates"] == MAX_UPDATE
    # the first restart works (stale keys in torchrun's store made it fail, so that it took a second one)
    assert sum(text.count("model: Wav2Vec2Model") for text in out) == 2, "expected one start and one restart"
    assert "connectFullMesh failed" not in out[0] + out[1]
    resumed = [line for text in out for line in text.splitlines() if line.startswith("resumed from")]
    assert len(resumed) == 1 and f"{run / 'checkpoint_last.pt'} at update" in resumed[0]
    assert f"done: update {MAX_UPDATE}" in out[0] + out[1]
    # the survivor says what happened in one line instead of a traceback
    assert "lost the connection to another process" in out[0] + out[1]
    assert "Traceback" not in out[0] + out[1]


def test_fresh_namespace_ignores_the_keys_of_earlier_workers():
    """Three 'restarted' ranks (one late) agree on one new prefix although a dead generation left its join
    ids, roster, acknowledgements and go in the store."""
    import threading

    import torch.distributed as dist

    from speechssl.train.distributed import DistributedError, fresh_namespace

    store = dist.HashStore()
    for key, value in (("join/0", "a"), ("join/1", "b"), ("join/2", "c"), ("roster", "old a b c"), ("ack/1", "old"),
                       ("ack/2", "old"), ("go", "old")):
        store.set(f"speechssl/{key}", value)
    names: dict[int, str] = {}

    def rank(r: int, delay: float) -> None:
        time.sleep(delay)
        names[r] = fresh_namespace(store, r, 3, timeout=30, poll=0.005)

    threads = [threading.Thread(target=rank, args=(r, d)) for r, d in ((0, 0.0), (1, 0.05), (2, 0.3))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(names.values())) == 1 and names[0] != "old" and sorted(names) == [0, 1, 2]
    with pytest.raises(DistributedError, match="rank 0: rank\\(s\\) 1 of 2 did not join within 0.2 s"):
        fresh_namespace(dist.HashStore(), 0, 2, timeout=0.2, poll=0.01)
