"""Run every speechssl command against a folder of broken inputs and check how each one fails.

    python tools/abuse.py [--keep DIR] [--only SUBSTRING] [--timeout 120]

Builds (in a temporary folder, or DIR) broken inputs -- empty, truncated, random and text files where
checkpoints belong, a fairseq and a transformers file, recipes that are not YAML, manifests listing
deleted audio, a file where a folder belongs, /proc as an output, a folder of the user's files as an
export target -- plus a few good files (a tiny pretraining checkpoint, a speaker-ID checkpoint, a
manifest), then runs each case of :data:`CASES` as ``python -m speechssl ...`` and asserts:

* the exit status is not 0 (and the command ends: a timeout is a failure);
* no Python traceback, and never the advice to load with ``weights_only=False``;
* the message names the file or the setting (the case's ``expect`` strings);
* nothing of the user's is deleted, changed or half-written: every input file is as before, and no
  file appears in the user's folders (temporary files included).

Exit status 1 if any case fails. ``tests/test_abuse.py`` runs the same cases in-process.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Case:
    name: str
    argv: list[str]  # {in}: the broken inputs, {good}: good inputs, {out}: a fresh output folder
    expect: list[str]  # every string must be in the output (after formatting)
    rc: Optional[int] = None  # exact exit status, when it matters (2: usage / config errors)


@dataclass
class Result:
    rc: Optional[int]  # None: timed out
    output: str
    seconds: float
    problems: list[str] = field(default_factory=list)


TINY = "recipes/wav2vec2_tiny.yaml"
FAST = ["optimization.max_update=2", "dataset.num_workers=0", "common.device=cpu"]

CASES: list[Case] = [
    # config: recipes that are not recipes, outputs that cannot be written, out-of-range values
    Case("config: no such recipe", ["config", "no_such_recipe"], ["recipe not found: no_such_recipe"], 2),
    Case("config: recipe not YAML", ["config", "{in}/bad.yaml"], ["bad.yaml", "not valid YAML"], 2),
    Case("config: recipe is binary", ["config", "{in}/random.pt"], ["random.pt", "not a text file"], 2),
    Case("config: recipe is a folder", ["config", "{in}/folder"], ["folder", "give a recipe file"], 2),
    Case("config: --out is a folder", ["config", "wav2vec2_tiny", "--out", "{in}/folder"], ["{in}/folder", "folder"]),
    Case("config: --out in /proc", ["config", "wav2vec2_tiny", "--out", "/proc/speechssl.yaml"],
         ["/proc/speechssl.yaml"]),
    Case("config: --out under a file", ["config", "wav2vec2_tiny", "--out", "{in}/a_file/x.yaml"], ["a_file"]),
    Case("config: lr out of range", ["config", "wav2vec2_tiny", "optimization.lr=-1"],
         ["optimization.lr=-1.0", "must be > 0"], 2),
    Case("config: heads", ["config", "wav2vec2_tiny", "model.encoder_embed_dim=250"],
         ["model.encoder_embed_dim=250", "model.encoder_attention_heads=4"], 2),
    # manifest
    Case("manifest: --out is a file", ["manifest", "{good}/audio", "--out", "{in}/a_file"], ["a_file"]),
    Case("manifest: --out in /proc", ["manifest", "{good}/audio", "--out", "/proc/speechssl_manifest"],
         ["/proc/speechssl_manifest"]),
    Case("manifest: --check finds deleted audio", ["manifest", "--check", "{in}/missing_audio"], ["gone.flac"]),
    # pretrain / finetune: bad data, settings, save_dir, upstream files
    Case("pretrain: deleted audio", ["pretrain", TINY, "task.data={in}/missing_audio", "checkpoint.save_dir={out}",
                                     *FAST], ["gone.flac", "line 3", "speechssl manifest --check"]),
    Case("pretrain: binary manifest", ["pretrain", TINY, "task.data={in}/binary_manifest",
                                       "checkpoint.save_dir={out}", *FAST], ["train.tsv", "not a text file"]),
    Case("pretrain: batch size 0", ["pretrain", TINY, "task.data={good}/manifest", "dataset.batch_size=0",
                                    "checkpoint.save_dir={out}"], ["dataset.batch_size=0", ">= 1"], 2),
    Case("pretrain: negative workers", ["pretrain", TINY, "task.data={good}/manifest", "dataset.num_workers=-3",
                                        "checkpoint.save_dir={out}"], ["dataset.num_workers=-3"], 2),
    Case("pretrain: save_dir is a file", ["pretrain", TINY, "task.data={good}/manifest",
                                          "checkpoint.save_dir={in}/a_file", *FAST],
         ["checkpoint.save_dir", "a_file"], 2),
    Case("pretrain: save_dir in /proc", ["pretrain", TINY, "task.data={good}/manifest",
                                         "checkpoint.save_dir=/proc/speechssl_run", *FAST],
         ["checkpoint.save_dir=/proc/speechssl_run"], 2),
    Case("pretrain: recipe is binary", ["pretrain", "{in}/random.pt", "task.data={good}/manifest"],
         ["random.pt", "not a text file"], 2),
    *[Case(f"finetune: upstream is {what}", ["finetune", "recipes/ctc_tiny.yaml", "task.data={good}/manifest",
                                              f"model.w2v_path={{in}}/{name}", "checkpoint.save_dir={out}", *FAST],
           [name, *expect])
      for what, name, expect in (
          ("a fairseq checkpoint", "fairseq.pt",
           ["a fairseq checkpoint", "speechssl import {in}/fairseq.pt --from fairseq"]),
          ("a transformers file", "hf/pytorch_model.bin", ["transformers", "speechssl import {in}/hf --from hf"]),
          ("truncated", "truncated.pt", ["truncated"]),
          ("empty", "empty.pt", ["empty"]),
          ("random bytes", "random.pt", ["unknown format"]),
          ("a text file", "text.txt", ["text file"]))],
    # evaluate
    Case("evaluate: fairseq checkpoint", ["evaluate", "{in}/fairseq.pt", "{good}/manifest"],
         ["fairseq.pt", "--from fairseq"]),
    Case("evaluate: random bytes", ["evaluate", "{in}/random.pt", "{good}/manifest"], ["random.pt", "unknown format"]),
    Case("evaluate: empty file", ["evaluate", "{in}/empty.pt", "{good}/manifest"], ["empty.pt", "empty"]),
    Case("evaluate: a folder", ["evaluate", "{in}/folder", "{good}/manifest"], ["folder"]),
    Case("evaluate: --batch-size 0", ["evaluate", "{good}/speaker.pt", "{good}/manifest", "--batch-size", "0"],
         ["--batch-size", ">= 1"], 2),
    Case("evaluate: --batch-size -1", ["evaluate", "{good}/speaker.pt", "{good}/manifest", "--batch-size", "-1"],
         ["--batch-size"], 2),
    Case("evaluate: EER on one speaker", ["evaluate", "{good}/speaker.pt", "{good}/manifest", "--split", "valid",
                                          "--eer-trials", "10", "--eer-split", "one_speaker"],
         ["one_speaker.spk", "2 speakers"]),
    Case("evaluate: --out is a file", ["evaluate", "{good}/speaker.pt", "{good}/manifest", "--out", "{in}/a_file"],
         ["--out {in}/a_file", "is a file"]),
    Case("evaluate: deleted audio", ["evaluate", "{good}/speaker.pt", "{in}/missing_audio", "--split", "train"],
         ["gone.flac", "missing"]),
    # export / extract
    Case("export: fairseq checkpoint", ["export", "{in}/fairseq.pt", "--to", "torchaudio", "--out", "{out}"],
         ["fairseq.pt", "--from fairseq"]),
    Case("export: truncated", ["export", "{in}/truncated.pt", "--to", "hf", "--out", "{out}"], ["truncated"]),
    Case("export --force: a folder of user files", ["export", "{good}/pretrain.pt", "--to", "torchaudio", "--out",
                                                    "{in}/user_folder", "--force"],
         ["user_folder", "notes.txt", "did not write"]),
    Case("export: --out is a file", ["export", "{good}/pretrain.pt", "--to", "torchaudio", "--out", "{in}/a_file"],
         ["a_file", "is a file"]),
    Case("export: --out in /proc", ["export", "{good}/pretrain.pt", "--to", "torchaudio", "--out",
                                    "/proc/speechssl_export"], ["/proc/speechssl_export"]),
    Case("extract: transformers file", ["extract", "{in}/hf/pytorch_model.bin", "{good}/manifest", "--split", "train",
                                        "--out", "{out}"], ["pytorch_model.bin", "--from hf"]),
    Case("extract: --nshard 0", ["extract", "{good}/pretrain.pt", "{good}/manifest", "--split", "train",
                                 "--out", "{out}", "--nshard", "0"], ["--nshard"], 2),
    Case("extract: deleted audio", ["extract", "{good}/pretrain.pt", "{in}/missing_audio", "--split", "train",
                                    "--out", "{out}", "--num-workers", "0"], ["gone.flac", "missing"]),
    # import
    *[Case(f"import --from fairseq: {what}", ["import", f"{{in}}/{name}", "--from", "fairseq", "--out", "{out}/x.pt"],
           [name, *expect])
      for what, name, expect in (("random bytes", "random.pt", ["not a fairseq checkpoint"]),
                                 ("empty file", "empty.pt", ["empty"]),
                                 ("text file", "text.txt", ["text file"]),
                                 ("folder", "folder", ["folder"]))],
    Case("import --from fairseq2: binary file", ["import", "{in}/random.pt", "--from", "fairseq2", "--out",
                                                 "{out}/x.pt"], ["random.pt", "asset card"]),
    Case("import --from hf: a file", ["import", "{in}/random.pt", "--from", "hf", "--out", "{out}/x.pt"],
         ["random.pt"]),
    Case("import: --out exists", ["import", "{in}/fairseq.pt", "--from", "fairseq", "--out", "{in}/text.txt"],
         ["text.txt", "--force"]),
    # features / kmeans / label / plot / spm
    Case("features: deleted audio", ["features", "mfcc", "{in}/missing_audio", "--split", "train", "--out", "{out}",
                                     "--num-workers", "0"], ["gone.flac", "missing"]),
    Case("features: --nshard 0", ["features", "mfcc", "{good}/manifest", "--out", "{out}", "--nshard", "0"],
         ["--nshard"], 2),
    Case("kmeans: --k 0", ["kmeans", "{in}/folder", "--k", "0", "--out", "{out}/km.pt"], ["--k"], 2),
    Case("kmeans: no features", ["kmeans", "{in}/folder", "--k", "4", "--out", "{out}/km.pt"], ["folder"]),
    Case("kmeans: random bytes", ["kmeans", "{in}/random.pt", "--k", "4", "--out", "{out}/km.pt"], ["random.pt"]),
    Case("label: random k-means model", ["label", "{good}/manifest", "--features", "{in}/folder", "--km",
                                         "{in}/random.pt", "--out", "{out}"], ["random.pt", "k-means model"]),
    Case("probe: fairseq checkpoint", ["probe", "{in}/fairseq.pt", "{good}/manifest", "--task", "sid"],
         ["fairseq.pt", "--from fairseq"]),
    Case("probe: --batch-size 0", ["probe", "fbank", "{good}/manifest", "--task", "asr", "--batch-size", "0"],
         ["--batch-size"], 2),
    Case("plot: no run", ["plot", "{in}/folder"], ["metrics.jsonl"]),
    Case("spm: binary transcripts", ["spm", "train", "{in}/random.pt", "--out", "{out}/spm"], ["random.pt"]),
]


# --------------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------------


def make_inputs(root: Path) -> tuple[Path, Path]:
    """Write the broken inputs to ``root/in`` and the good ones to ``root/good``; return both folders."""
    import argparse as _argparse

    import numpy as np
    import soundfile as sf
    import torch

    from speechssl.config import Config, TaskConfig
    from speechssl.models import build_model, wav2vec2_tiny_config
    from speechssl.tasks.speaker_id import build_speaker_model
    from speechssl.train.checkpoint import save_checkpoint

    bad, good = root / "in", root / "good"
    for d in (bad, good / "audio", good / "manifest"):
        d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    # good: audio of three speakers, a manifest with speaker labels, a pretraining and a speaker-ID checkpoint
    lines, speakers = [str(good / "audio")], []
    for i in range(6):
        name = f"s{i % 3}_{i}.flac"
        sf.write(good / "audio" / name, (0.1 * rng.standard_normal(16000)).astype(np.float32), 16000)
        lines.append(f"{name}\t16000")
        speakers.append(f"s{i % 3}")
    for split in ("train", "valid"):
        (good / "manifest" / f"{split}.tsv").write_text("\n".join(lines) + "\n")
        (good / "manifest" / f"{split}.spk").write_text("\n".join(speakers) + "\n")
        (good / "manifest" / f"{split}.wrd").write_text("".join("A B\n" for _ in speakers))
        (good / "manifest" / f"{split}.ltr").write_text("".join("A | B |\n" for _ in speakers))
    (good / "manifest" / "dict.ltr.txt").write_text("| 12\nA 6\nB 6\n")
    (good / "manifest" / "one_speaker.tsv").write_text("\n".join(lines[:3]) + "\n")
    (good / "manifest" / "one_speaker.spk").write_text("s0\ns0\n")
    model_cfg = wav2vec2_tiny_config()
    torch.manual_seed(0)
    pre = Config(model=model_cfg)
    save_checkpoint({"model": build_model(model_cfg).state_dict(), "config": pre.to_dict(), "num_updates": 0},
                    good / "pretrain.pt")
    spk_cfg = Config(model=model_cfg, task=TaskConfig(name="speaker_id", labels=["spk"]))
    spk_cfg.criterion.name = "speaker_id"
    speaker_model = build_speaker_model(model_cfg, ["s0", "s1", "s2"], load_upstream=False)
    save_checkpoint({"model": speaker_model.state_dict(), "config": spk_cfg.to_dict(), "num_updates": 0},
                    good / "speaker.pt")
    # broken
    (bad / "empty.pt").write_bytes(b"")
    (bad / "random.pt").write_bytes(rng.bytes(4096))
    (bad / "text.txt").write_text("hello, not a checkpoint\n")
    (bad / "truncated.pt").write_bytes((good / "pretrain.pt").read_bytes()[:1000])
    (bad / "folder").mkdir(exist_ok=True)
    (bad / "a_file").write_text("a file where a folder is expected\n")
    (bad / "bad.yaml").write_text("model: [unclosed\n")
    weights = {"encoder.layers.0.self_attn.k_proj.weight": torch.zeros(2, 2)}
    torch.save({"args": _argparse.Namespace(arch="wav2vec2", encoder_layers=1), "model": weights,
                "optimizer_history": [{"num_updates": 10}]}, bad / "fairseq.pt")
    (bad / "hf").mkdir(exist_ok=True)
    (bad / "hf" / "config.json").write_text('{"model_type": "wav2vec2"}\n')
    torch.save({"wav2vec2.encoder.layers.0.attention.k_proj.weight": torch.zeros(2, 2)},
               bad / "hf" / "pytorch_model.bin")
    missing = bad / "missing_audio"
    missing.mkdir(exist_ok=True)
    (missing / "train.tsv").write_text(f"{good / 'audio'}\n{lines[1]}\ngone.flac\t16000\n{lines[2]}\n")
    (missing / "train.spk").write_text("s0\ns1\ns1\n")
    (missing / "valid.tsv").write_text(f"{good / 'audio'}\n{lines[1]}\n")
    (bad / "binary_manifest").mkdir(exist_ok=True)
    (bad / "binary_manifest" / "train.tsv").write_bytes(b"\xff\xfe\x00" + rng.bytes(200))
    (bad / "binary_manifest" / "valid.tsv").write_bytes(b"\xff\xfe\x00" + rng.bytes(200))
    user = bad / "user_folder"
    (user / "sub").mkdir(parents=True, exist_ok=True)
    (user / "notes.txt").write_text("the user's notes\n")
    (user / "sub" / "keep.txt").write_text("keep me\n")
    (user / "config.json").write_text("{}\n")
    return bad, good


def snapshot(folder: Path) -> dict[str, tuple[int, str]]:
    """Every entry under ``folder``: relative path -> (mode, sha1 of the content or 'dir')."""
    out = {}
    for p in sorted(folder.rglob("*")):
        st = p.lstat()
        digest = "dir" if p.is_dir() else hashlib.sha1(p.read_bytes()).hexdigest()
        out[str(p.relative_to(folder))] = (st.st_mode, digest)
    return out


# --------------------------------------------------------------------------------------------------
# running
# --------------------------------------------------------------------------------------------------


def expand(items: list[str], bad: Path, good: Path, out: Path) -> list[str]:
    return [s.format(**{"in": bad, "good": good, "out": out}) for s in items]


def _limit_child_memory() -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_AS)  # a runaway command fails instead of taking the machine
    limit = 16 << 30 if hard == resource.RLIM_INFINITY else min(16 << 30, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def run_subprocess(argv: list[str], timeout: float) -> tuple[Optional[int], str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_WAIT_POLICY": "PASSIVE"}
    try:
        res = subprocess.run([sys.executable, "-m", "speechssl", *argv], capture_output=True, text=True,
                             timeout=timeout, cwd=REPO, env=env, preexec_fn=_limit_child_memory)
    except subprocess.TimeoutExpired as exc:
        text = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
        return None, text
    return res.returncode, res.stdout + res.stderr


class _Timeout(BaseException):
    pass


MEMORY_HEADROOM = 6 << 30  # bytes an in-process case may add to the address space (a runaway loop fails fast)


@contextlib.contextmanager
def _memory_limit() -> Iterator[None]:
    """Lower the soft RLIMIT_AS to the current size + :data:`MEMORY_HEADROOM` for the block (Linux)."""
    import resource

    try:
        pages = int(Path("/proc/self/statm").read_text().split()[0])
    except OSError:
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = pages * os.sysconf("SC_PAGE_SIZE") + MEMORY_HEADROOM
    if hard != resource.RLIM_INFINITY and limit >= hard or soft != resource.RLIM_INFINITY and limit >= soft:
        yield
        return
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def run_inprocess(argv: list[str], timeout: float) -> tuple[Optional[int], str]:
    """``speechssl.cli.main(argv)`` with stdout/stderr captured; an escaping exception is reported as a
    traceback in the output (the check then fails), a command running past ``timeout`` as rc None. A
    memory limit keeps a runaway command (the batcher hang of issue 17) from taking the machine down."""
    import traceback

    from speechssl.cli import main

    def alarm(*_):
        raise _Timeout()

    buf = io.StringIO()
    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    cwd = os.getcwd()
    try:
        os.chdir(REPO)
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf), _memory_limit():
            try:
                rc: Optional[int] = main(argv)
            except SystemExit as exc:  # argparse
                rc = exc.code if isinstance(exc.code, int) else 1
            except _Timeout:
                rc = None
            except Exception:  # noqa: BLE001 -- what the user would see: a traceback
                traceback.print_exc(file=buf)
                rc = 1
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        os.chdir(cwd)
    return rc, buf.getvalue()


def check_case(case: Case, root: Path, bad: Path, good: Path, runner: Callable[[list[str], float], tuple],
               timeout: float) -> Result:
    """Run ``case`` and list what went wrong (``Result.problems``; empty: it failed the right way)."""
    out = Path(tempfile.mkdtemp(prefix="out-", dir=root))
    os.rmdir(out)  # a fresh path: the command may create it
    before = {name: snapshot(folder) for name, folder in (("in", bad), ("good", good))}
    t0 = time.perf_counter()
    rc, output = runner(expand(case.argv, bad, good, out), timeout)
    res = Result(rc, output, time.perf_counter() - t0)
    if rc is None:
        res.problems.append(f"did not end within {timeout:.0f} s")
    elif rc == 0:
        res.problems.append("exit status 0")
    elif case.rc is not None and rc != case.rc:
        res.problems.append(f"exit status {rc}, expected {case.rc}")
    if "Traceback (most recent call last)" in output:
        res.problems.append("a traceback")
    if "weights_only=False" in output:
        res.problems.append("suggests weights_only=False")
    for want in expand(case.expect, bad, good, out):
        if want not in output:
            res.problems.append(f"message lacks {want!r}")
    for name, folder in (("in", bad), ("good", good)):
        after = snapshot(folder)
        if after != before[name]:
            changed = sorted(set(after.items()) ^ set(before[name].items()))
            res.problems.append(f"the user's files changed: {', '.join(sorted({c[0] for c in changed})[:5])}")
    if out.exists():
        files = [str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()]
        if files:
            res.problems.append(f"left files behind in the output: {', '.join(files[:5])}")
    return res


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--keep", help="build the inputs in this folder and keep it")
    p.add_argument("--only", help="run only the cases whose name contains this")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per command")
    args = p.parse_args(argv)
    sys.path.insert(0, str(REPO))
    with contextlib.ExitStack() as stack:
        root = Path(args.keep) if args.keep else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        root.mkdir(parents=True, exist_ok=True)
        bad, good = make_inputs(root)
        failed = 0
        for case in CASES:
            if args.only and args.only not in case.name:
                continue
            res = check_case(case, root, bad, good, run_subprocess, args.timeout)
            last = (res.output.strip().splitlines() or ["(no output)"])[-1]
            print(f"{'FAIL' if res.problems else 'ok  '} {res.seconds:5.1f}s  {case.name}: {last[:150]}")
            for problem in res.problems:
                print(f"       - {problem}")
            failed += bool(res.problems)
        print(f"{failed} case(s) failed" if failed else "every case failed cleanly")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
