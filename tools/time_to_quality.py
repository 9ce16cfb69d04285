#!/usr/bin/env python
"""Time to quality: frozen-probe ASR CER (and, with --finetune, fine-tuned CER) reached per minute of pretraining.

For every ``--model NAME=RECIPE`` (e.g. data2vec2=recipes/data2vec2_tiny.yaml, wav2vec2=..., hubert=...),
one after the other on the same machine:

1. pretrain it on ``--unlabeled`` for at most ``--minutes`` of wall-clock time (``speechssl pretrain``, its
   own process; the recipe's ``optimization.max_update`` sets its learning-rate schedule, so choose it to
   end near the budget), writing a checkpoint every ``--save-every`` updates and keeping them all, without
   validation (each mid-epoch checkpoint would validate, which is not training time); a run still going at
   the budget is stopped (Ctrl-C: the checkpoints written so far are intact);
2. for every minute mark of ``--marks`` (default: the budget), take the newest checkpoint written within
   that much wall-clock time of the pretraining's start (process start-up included);
3. probe it: ``speechssl probe CKPT LABELED --task asr`` (SUPERB-style BiLSTM + CTC on the frozen hidden
   states; best by valid CER, scored on test); with ``--finetune``, also fine-tune it with
   ``--finetune-recipe`` (CTC on the labeled train split) and score the best checkpoint on test.

Results go to ``WORK/results.json`` and a markdown table ``WORK/results.md`` (model, minute mark, update,
probe valid / test CER, fine-tuned test CER). Everything resumes: a finished pretraining is not run again,
a finished probe or fine-tuning is read back. HuBERT recipes need their label overrides (task.label_dir=...)
as ``--override hubert=task.label_dir=DIR``; the time of the label pipeline is not counted.

    python tools/time_to_quality.py --model data2vec2=recipes/data2vec2_tiny.yaml --minutes 10 \\
        --unlabeled manifests/demo/unlabeled --labeled manifests/demo/labeled_10min --work runs/ttq
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", required=True, metavar="NAME=RECIPE",
                   help="a pretraining recipe to time (repeatable)")
    p.add_argument("--override", action="append", default=[], metavar="NAME=KEY=VALUE",
                   help="a pretraining override for model NAME (repeatable)")
    p.add_argument("--minutes", type=float, default=10.0, help="wall-clock budget of every pretraining")
    p.add_argument("--marks", type=float, nargs="+", default=None, help="minute marks to probe (default: --minutes)")
    p.add_argument("--save-every", type=int, default=50, help="checkpoint interval of the pretraining (updates)")
    p.add_argument("--unlabeled", default="manifests/demo/unlabeled")
    p.add_argument("--labeled", default="manifests/demo/labeled_10min")
    p.add_argument("--work", default="runs/time_to_quality")
    p.add_argument("--probe-arg", action="append", default=[], metavar="ARG",
                   help="extra 'speechssl probe' argument (repeatable, e.g. --probe-arg=--updates=1500)")
    p.add_argument("--finetune", action="store_true", help="also fine-tune every checkpoint with CTC and score it")
    p.add_argument("--finetune-recipe", default="recipes/ctc_tiny.yaml")
    p.add_argument("--finetune-override", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--nice", type=int, default=5, help="niceness of every child process")
    return p.parse_args(argv)


def speechssl(*args: str) -> list[str]:
    return [sys.executable, "-m", "speechssl", *args]


def run_logged(cmd: list[str], log: Path, nice: int, budget: float | None = None) -> tuple[int, float]:
    """Run ``cmd`` with output to ``log``; with ``budget`` (seconds), stop it (SIGINT, then SIGKILL) when it
    runs longer. Returns ``(exit status, start time)``."""
    env = dict(os.environ, OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))

    def child_setup() -> None:
        os.nice(nice)
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # a background shell ignores Ctrl-C; the child must not

    print(f"+ {' '.join(cmd)} (log: {log})", flush=True)
    with open(log, "a") as fh:
        start = time.time()
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
                                preexec_fn=child_setup)
        try:
            proc.wait(timeout=budget)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGINT)  # waits for a checkpoint being written, then exits
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return proc.returncode, start


def pretrain(name: str, recipe: str, overrides: list[str], args, work: Path) -> list[tuple[float, int, Path]]:
    """Pretrain (unless done) and return ``[(seconds after start, update, checkpoint)]`` of its checkpoints."""
    run = work / name
    marker = run / "time_to_quality.json"
    if not marker.exists():
        if run.exists():
            raise SystemExit(f"{run} holds an unfinished timed run; delete it to time {name} again (a resumed run "
                             "would not measure wall-clock time from the start)")
        run.mkdir(parents=True)
        cmd = speechssl("pretrain", recipe, f"task.data={args.unlabeled}", f"checkpoint.save_dir={run}",
                        f"checkpoint.save_interval_updates={args.save_every}", "checkpoint.keep_interval_updates=-1",
                        "dataset.disable_validation=true", "common.log_format=simple", *overrides)
        status, start = run_logged(cmd, work / f"{name}_pretrain.log", args.nice, budget=args.minutes * 60)
        if not list(run.glob("checkpoint_*_*.pt")):
            raise SystemExit(f"{name}: pretraining wrote no checkpoint (exit status {status}); see "
                             f"{work / f'{name}_pretrain.log'}")
        marker.write_text(json.dumps({"start": start, "status": status, "recipe": recipe, "overrides": overrides}))
    start = json.loads(marker.read_text())["start"]
    found = []
    for ckpt in run.glob("checkpoint_*_*.pt"):
        m = re.fullmatch(r"checkpoint_\d+_(\d+)\.pt", ckpt.name)
        if m:
            found.append((ckpt.stat().st_mtime - start, int(m.group(1)), ckpt))
    return sorted(found)


def probe(ckpt: Path, out: Path, args) -> dict:
    report = out / "probe.json"
    if not report.exists():
        status, _ = run_logged(speechssl("probe", str(ckpt), args.labeled, "--task", "asr", "--out", str(out),
                                         *args.probe_arg), out.parent / f"{out.name}.log", args.nice)
        if status != 0:
            raise SystemExit(f"probe of {ckpt} failed (exit status {status}); see {out.parent / f'{out.name}.log'}")
    return json.loads(report.read_text())


def finetune(ckpt: Path, out: Path, args) -> dict:
    report = out / "eval_test" / "report.json"
    if not report.exists():
        log = out.parent / f"{out.name}.log"
        status, _ = run_logged(speechssl("finetune", args.finetune_recipe, f"task.data={args.labeled}",
                                         f"model.w2v_path={ckpt}", f"checkpoint.save_dir={out}",
                                         "checkpoint.best_checkpoint_metric=cer", "common.log_format=simple",
                                         *args.finetune_override), log, args.nice)
        if status != 0:
            raise SystemExit(f"fine-tuning {ckpt} failed (exit status {status}); see {log}")
        status, _ = run_logged(speechssl("evaluate", str(out / "checkpoint_best.pt"), args.labeled, "--split",
                                         "test", "--out", str(out / "eval_test")), log, args.nice)
        if status != 0:
            raise SystemExit(f"evaluating {out / 'checkpoint_best.pt'} failed; see {log}")
    return json.loads(report.read_text())


def main(argv=None) -> int:
    args = parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    marks = args.marks or [args.minutes]
    models = dict(m.split("=", 1) for m in args.model)
    overrides: dict[str, list[str]] = {name: [] for name in models}
    for item in args.override:
        name, _, value = item.partition("=")
        if name not in models:
            raise SystemExit(f"--override {item}: no --model named {name}")
        overrides[name].append(value)
    rows = []
    for name, recipe in models.items():
        checkpoints = pretrain(name, recipe, overrides[name], args, work)
        for mark in marks:
            within = [c for c in checkpoints if c[0] <= mark * 60]
            if not within:
                print(f"{name}: no checkpoint within {mark:g} minutes (first at {checkpoints[0][0] / 60:.1f} min)")
                continue
            seconds, update, ckpt = within[-1]
            row = {"model": name, "minutes": mark, "checkpoint_minutes": round(seconds / 60, 2), "update": update,
                   "checkpoint": str(ckpt)}
            result = probe(ckpt, work / f"probe_{name}_{mark:g}min", args)
            row.update(probe_valid_cer=result["valid_cer"], probe_test_cer=result.get("test_cer"))
            if args.finetune:
                report = finetune(ckpt, work / f"ft_{name}_{mark:g}min", args)
                row.update(finetuned_test_cer=report["cer"], finetuned_test_wer=report["wer"])
            rows.append(row)
            print(json.dumps(row), flush=True)
    (work / "results.json").write_text(json.dumps(rows, indent=1) + "\n")
    lines = ["| model | minutes | update | probe valid CER % | probe test CER % |" + (" fine-tuned test CER % |" if
             args.finetune else ""), "|---|---|---|---|---|" + ("---|" if args.finetune else "")]
    for r in rows:
        line = f"| {r['model']} | {r['minutes']:g} ({r['checkpoint_minutes']:.1f}) | {r['update']} | " \
               f"{r['probe_valid_cer']:.1f} | {r['probe_test_cer']:.1f} |"
        if args.finetune:
            line += f" {r['finetuned_test_cer']:.1f} |"
        lines.append(line)
    (work / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
