"""Training runs facing user mistakes and accidents: sizes of 0 (no hang), damaged checkpoints, a full disk,
unwritable outputs, missing audio, and what a run says at the end, while validating and on Ctrl-C."""

import os
import resource
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from speechssl.cli import main
from speechssl.train import metrics
from speechssl.train.checkpoint import load_checkpoint
from train_fixtures import make_corpus, tiny_recipe

LENGTHS = [8000 + 211 * i for i in range(20)]


def cli(*args):
    return [sys.executable, "-m", "speechssl", *map(str, args)]


def env():
    return {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_WAIT_POLICY": "PASSIVE"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("errors")
    man = make_corpus(tmp, {"train": LENGTHS, "valid": [9000, 10000, 9500]})
    recipe = tiny_recipe(tmp / "tiny.yaml", optimization={"max_update": 8},
                         checkpoint={"save_interval_updates": 4, "keep_interval_updates": 1})
    return tmp, man, recipe


def run(corpus, save_dir, *extra):
    _, man, recipe = corpus
    return main(["pretrain", str(recipe), f"task.data={man}", f"checkpoint.save_dir={save_dir}", *extra])


# --------------------------------------------------------------------------------------------------
# item 1: sizes of 0 or less are refused, never a batcher that piles up empty batches
# --------------------------------------------------------------------------------------------------


BATCHER = """
import numpy as np
from speechssl.data.batching import batch_by_size
sizes = np.array([100, 90, 80])
for kwargs in ({"max_tokens": None, "max_sentences": 0}, {"max_tokens": 0}, {"max_tokens": 500, "max_sentences": -1}):
    try:
        batch_by_size(np.argsort(-sizes), sizes, **kwargs)
    except ValueError as exc:
        assert "must be >= 1" in str(exc), exc
    else:
        raise SystemExit(f"no error for {kwargs}")
"""


def limited_memory():
    resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))  # a batcher that piles up batches fails fast


def test_batcher_refuses_sizes_below_one():
    # in a process of its own, under a timeout and a memory limit: the bug was a loop that never ends
    res = subprocess.run([sys.executable, "-c", BATCHER], capture_output=True, text=True, env=env(), timeout=60,
                         preexec_fn=limited_memory)
    assert res.returncode == 0, res.stderr[-2000:]


@pytest.mark.parametrize("args", [
    ["pretrain", "{recipe}", "task.data={man}", "dataset.batch_size=0", "checkpoint.save_dir={tmp}/bs0"],
    ["pretrain", "{recipe}", "task.data={man}", "dataset.batch_size=-1", "dataset.max_tokens=null",
     "checkpoint.save_dir={tmp}/bs-1"],
    ["evaluate", "{tmp}/any.pt", "{man}", "--batch-size", "0"],
    ["evaluate", "{tmp}/any.pt", "{man}", "--batch-size", "-1"],
    ["evaluate", "{tmp}/any.pt", "{man}", "--max-tokens", "0"],
])
def test_batch_size_zero_ends_with_an_error_not_a_hang(corpus, args):
    tmp, man, recipe = corpus
    args = [a.format(tmp=tmp, man=man, recipe=recipe) for a in args]
    res = subprocess.run(cli(*args), capture_output=True, text=True, timeout=60, env=env(),
                         preexec_fn=limited_memory)
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    assert ("batch_size=" in res.stderr and "must be >= 1" in res.stderr) or "must be an integer >= 1" in res.stderr


# --------------------------------------------------------------------------------------------------
# item 2: independent checkpoints; a damaged checkpoint_last.pt falls back to the newest intact one
# --------------------------------------------------------------------------------------------------


def damage(path, how):
    if how == "truncated":
        os.truncate(path, 1000)
    elif how == "zero bytes":
        os.truncate(path, 0)
    else:
        path.write_bytes(np.random.default_rng(0).bytes(path.stat().st_size))


def test_checkpoints_are_independent_files(corpus, tmp_path, capsys):
    assert run(corpus, tmp_path) == 0
    files = [tmp_path / n for n in ("checkpoint_last.pt", "checkpoint_best.pt", "checkpoint_1_8.pt")]
    stats = [f.stat() for f in files]
    assert all(s.st_nlink == 1 for s in stats) and len({s.st_ino for s in stats}) == 3
    damage(files[0], "truncated")
    assert load_checkpoint(files[2])["num_updates"] == 8  # the others are unharmed


@pytest.mark.parametrize("how", ["truncated", "zero bytes", "random bytes"])
def test_damaged_last_checkpoint_resumes_from_the_newest_intact_one(corpus, tmp_path, capsys, how):
    assert run(corpus, tmp_path) == 0
    damage(tmp_path / "checkpoint_last.pt", how)
    capsys.readouterr()
    assert run(corpus, tmp_path, "optimization.max_update=12") == 0
    out = capsys.readouterr().out
    assert f"warning: {tmp_path / 'checkpoint_last.pt'} is" in out
    assert "(update 8), the newest intact checkpoint" in out  # checkpoint_1_8.pt or its copy checkpoint_best.pt
    assert "resumed from" in out and "at update 8 " in out
    assert load_checkpoint(tmp_path / "checkpoint_last.pt")["num_updates"] == 12


def test_no_intact_checkpoint_is_an_error_naming_the_file_and_the_options(corpus, tmp_path, capsys):
    assert run(corpus, tmp_path) == 0
    for p in tmp_path.glob("checkpoint*.pt"):
        damage(p, "truncated")
    capsys.readouterr()
    assert run(corpus, tmp_path, "optimization.max_update=12") == 1
    err = capsys.readouterr().err
    assert f"cannot resume: {tmp_path / 'checkpoint_last.pt'} is truncated or damaged" in err
    assert "--restart --force" in err and "checkpoint.save_dir" in err
    assert "Traceback" not in err


def test_full_disk_while_saving_keeps_the_old_checkpoint_and_says_so(corpus, tmp_path):
    _, man, recipe = corpus
    assert run(corpus, tmp_path, "optimization.max_update=4") == 0
    good = (tmp_path / "checkpoint_last.pt").read_bytes()
    limit = len(good) // 2  # every checkpoint file is larger: its write fails as on a full disk

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    res = subprocess.run(cli("pretrain", recipe, f"task.data={man}", f"checkpoint.save_dir={tmp_path}",
                             "optimization.max_update=8"), capture_output=True, text=True, env=env(), timeout=120,
                         preexec_fn=small_files)
    assert res.returncode == 1
    assert "Traceback" not in res.stderr and "PytorchStreamWriter" not in res.stderr
    assert f"{tmp_path / 'checkpoint_1_8.pt'}: File too large" in res.stderr or "File too large" in res.stderr
    assert "checkpoints already written are intact" in res.stderr
    assert (tmp_path / "checkpoint_last.pt").read_bytes() == good
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left


@pytest.mark.parametrize("save_dir, message", [("{file}", "is a file"), ("/proc/speechssl_run", "cannot write there")])
def test_save_dir_that_cannot_be_a_folder(corpus, tmp_path, capsys, save_dir, message):
    (tmp_path / "a_file").write_text("mine\n")
    save_dir = save_dir.format(file=tmp_path / "a_file")
    assert run(corpus, save_dir) == 2
    err = capsys.readouterr().err
    assert f"config error: checkpoint.save_dir={save_dir}" in err and message in err
    assert (tmp_path / "a_file").read_text() == "mine\n"


# --------------------------------------------------------------------------------------------------
# item 6: missing audio is found at start-up, all of it; a read error mid-run names file and line
# --------------------------------------------------------------------------------------------------


def test_missing_audio_is_reported_at_start_all_at_once(tmp_path, capsys):
    man = make_corpus(tmp_path, {"train": LENGTHS, "valid": [9000]})
    recipe = tiny_recipe(tmp_path / "tiny.yaml")
    lines = (man / "train.tsv").read_text().splitlines()
    for line in (lines[3], lines[7]):
        (tmp_path / "audio" / line.split("\t")[0]).unlink()
    assert main(["pretrain", str(recipe), f"task.data={man}", f"checkpoint.save_dir={tmp_path / 'run'}"]) == 1
    captured = capsys.readouterr()
    assert f"{man / 'train.tsv'}: 2 of 20 listed audio files are missing" in captured.err
    assert "line 4: " in captured.err and "line 8: " in captured.err
    assert f"speechssl manifest --check {man}" in captured.err
    assert "update" not in captured.out  # no training started


@pytest.mark.parametrize("workers", [0, 1])
def test_read_error_mid_run_names_file_and_manifest_line(tmp_path, capsys, workers):
    man = make_corpus(tmp_path, {"train": LENGTHS, "valid": [9000]})
    recipe = tiny_recipe(tmp_path / "tiny.yaml", dataset={"num_workers": workers})
    name = (man / "train.tsv").read_text().splitlines()[5].split("\t")[0]
    (tmp_path / "audio" / name).write_bytes(b"not audio any more" * 100)  # exists, so start-up passes
    # an escaping exception would fail the test; the message from a DataLoader worker carries no traceback
    assert main(["pretrain", str(recipe), f"task.data={man}", f"checkpoint.save_dir={tmp_path / 'run'}"]) == 1
    err = capsys.readouterr().err
    assert f"cannot read {tmp_path / 'audio' / name}" in err
    assert f"listed at {man / 'train.tsv'}:6" in err
    assert "Traceback" not in err


# --------------------------------------------------------------------------------------------------
# item 8: the end of a run, Ctrl-C, validation progress
# --------------------------------------------------------------------------------------------------


def test_run_ends_with_a_summary(corpus, tmp_path, capsys):
    assert run(corpus, tmp_path) == 0
    out = capsys.readouterr().out.splitlines()
    end = out[out.index(next(line for line in out if line.startswith("done: "))):]
    assert end[0].startswith("done: update 8 (epoch ") and "8 updates in " in end[0]
    best = load_checkpoint(tmp_path / "checkpoint_best.pt")
    assert end[1] == (f"best valid loss {best['best']:.4g} at update {best['num_updates']}: "
                      f"{tmp_path / 'checkpoint_best.pt'}")
    assert end[2] == f"last: {tmp_path / 'checkpoint_last.pt'}"
    assert end[3] == "next:" and end[4] == f"  speechssl plot {tmp_path}"
    assert end[5] == f"  speechssl probe {tmp_path / 'checkpoint_best.pt'} LABELED_MANIFEST_DIR --task asr"
    assert "recipes/ctc_tiny.yaml" in end[6] and f"model.w2v_path={tmp_path / 'checkpoint_best.pt'}" in end[6]
    assert end[7].startswith("  speechssl export ")


def test_summary_of_a_log_mel_data2vec_run_points_at_the_last_checkpoint_and_the_mel_ctc_recipe(tmp_path):
    from types import SimpleNamespace

    from speechssl.config import load_config
    from speechssl.train.loop import end_summary

    cfg = load_config("recipes/data2vec2_tiny.yaml", [f"checkpoint.save_dir={tmp_path}"])
    (tmp_path / "checkpoint_best.pt").write_bytes(b"")
    loop = SimpleNamespace(cfg=cfg, trainer=SimpleNamespace(num_updates=10), save_dir=tmp_path, epoch=1, offset=1,
                           start_update=0, best=1.0, best_update=10)
    end = end_summary(loop, 5.0)
    assert f"  speechssl probe {tmp_path / 'checkpoint_last.pt'} LABELED_MANIFEST_DIR --task asr" in end
    ctc = next(line for line in end if "finetune" in line)
    assert "recipes/ctc_mel_tiny.yaml" in ctc and f"model.w2v_path={tmp_path / 'checkpoint_last.pt'}" in ctc
    assert not any("export" in line for line in end)  # log-mel models do not export


def test_ctrl_c_says_which_update_the_next_run_resumes_from(corpus, tmp_path):
    _, man, recipe = corpus
    proc = subprocess.Popen(cli("pretrain", recipe, f"task.data={man}", f"checkpoint.save_dir={tmp_path}",
                                "optimization.max_update=400", "checkpoint.save_interval_updates=2"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(),
                            # a shell's background job starts with SIGINT ignored, and so would the run: restore it
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120

    def saved_an_update_from_4_on():  # interval checkpoints rotate: the one of update 4 may be gone already
        return any(int(p.stem.rsplit("_", 1)[1]) >= 4 for p in tmp_path.glob("checkpoint_*_*.pt"))

    while not saved_an_update_from_4_on() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    saved = load_checkpoint(tmp_path / "checkpoint_last.pt")["num_updates"]
    assert 4 <= saved < 400
    assert f"running the same command again resumes from update {saved} ({tmp_path / 'checkpoint_last.pt'})" in out
    assert "speechssl pretrain: interrupted" in err and "Traceback" not in err


def test_validation_shows_progress_and_eta(corpus, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(metrics, "PROGRESS_SECONDS", 0.0)
    assert run(corpus, tmp_path, "optimization.max_update=4", "dataset.max_tokens=12000",
               "task.max_sample_size=12000") == 0
    out = capsys.readouterr().out
    assert "valid (update 4): 1/3 batch (33%), eta 0:00:0" in out
    assert "valid (update 4): 2/3 batch (67%), eta" in out


def test_progress_lines_only_when_slow(capsys, monkeypatch):
    assert list(metrics.Progress(range(5), 5, "work")) == list(range(5))
    assert capsys.readouterr().out == ""  # quick work: no lines
    monkeypatch.setattr(metrics, "PROGRESS_SECONDS", 0.0)
    list(metrics.Progress(range(4), 4, "work", unit="utt"))
    assert capsys.readouterr().out.splitlines()[0].startswith("work: 1/4 utt (25%), eta ")
