#!/usr/bin/env python
"""Does self-supervised pretraining help? Pretrained vs from-scratch CTC on 10 minutes of labels.

On the demo corpus (tools/demo.sh builds its manifests):

1. pretrain the upstream on the unlabeled audio of all training speakers (``--pretrain-recipe``;
   resumes, or returns at once when the run is finished), or reuse checkpoints with ``--pretrained
   [NAME=]CKPT`` (repeatable: e.g. a wav2vec 2.0 and a HuBERT one of the same architecture);
2. fine-tune each pretrained upstream with CTC on the ~10-minute labeled subset (``--finetune-recipe``,
   ``--updates``);
3. train the same architecture (the first upstream's) from scratch on the same 10 minutes with the same
   recipe and number of updates; its conv front-end is trained too (a frozen random front-end would be
   a straw man);
4. evaluate the best checkpoint of every run (lowest valid WER; valid = dev speakers) on the held-out
   test speakers, and print / write a markdown table of WER and CER.

The test split is decoded only at the end; every choice is made on valid. Runs resume: re-running the
same command after an interruption continues, and finished runs are only re-evaluated.

    python tools/experiment_low_resource.py                  # pretrain + both fine-tunings (~1-2 h, 2 cores)
    python tools/experiment_low_resource.py --pretrained runs/tiny/checkpoint_best.pt --updates 1000
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEMO = Path(os.environ.get("SPEECHSSL_DEMO_DIR", Path.home() / ".cache/speechssl/demo"))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--unlabeled", default="manifests/demo/unlabeled", help="pretraining manifest folder")
    p.add_argument("--labeled", default="manifests/demo/labeled_10min",
                   help="fine-tuning manifest folder (train, valid = dev speakers, test = held-out speakers)")
    p.add_argument("--work", default=str(DEMO / "runs/ctc_10min"), help="output folder of all runs")
    p.add_argument("--pretrain-recipe", default="recipes/wav2vec2_tiny.yaml")
    p.add_argument("--pretrain-updates", type=int, default=2000)
    p.add_argument("--pretrain-override", action="append", default=[], metavar="KEY=VALUE",
                   help="extra pretraining overrides (repeatable)")
    p.add_argument("--pretrained", action="append", default=[], metavar="[NAME=]CKPT",
                   help="fine-tune this pretrained checkpoint instead of pretraining (repeatable; NAME names the "
                   "run folder WORK/ft_NAME and the table row, default 'pretrained')")
    p.add_argument("--finetune-recipe", default="recipes/ctc_tiny.yaml")
    p.add_argument("--updates", type=int, default=2000, help="fine-tuning updates of every run")
    p.add_argument("--finetune-override", action="append", default=[], metavar="KEY=VALUE",
                   help="fine-tuning overrides for every run (repeatable)")
    p.add_argument("--pretrained-override", action="append", default=[], metavar="KEY=VALUE",
                   help="fine-tuning overrides for the pretrained runs only (e.g. a learning rate chosen on valid)")
    p.add_argument("--scratch-override", action="append", default=[], metavar="KEY=VALUE",
                   help="fine-tuning overrides for the from-scratch run only")
    p.add_argument("--parallel", action="store_true",
                   help="run the fine-tunings at the same time (one thread each; logs in WORK/ft_NAME.log)")
    p.add_argument("--split", default="test", help="split the final table reports")
    p.add_argument("--table", help="also write the markdown table here (default: WORK/results.md)")
    return p.parse_args(argv)


def speechssl(*args: str) -> None:
    """Run one speechssl command in a subprocess (its output streams through)."""
    print("+ speechssl " + " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "speechssl", *args], check=True, cwd=ROOT)


def conv_layers_literal(layers) -> str:
    return "[" + ", ".join(f"({c}, {k}, {s})" for c, k, s in layers) + "]"


def arch_overrides(pretrained: Path) -> list[str]:
    """``model.*`` overrides giving a from-scratch run the pretrained checkpoint's architecture (every
    ModelConfig field except the fine-tuning ones)."""
    from speechssl.config import ModelConfig
    from speechssl.models.ctc import FINETUNE_FIELDS
    from speechssl.models.pretrained import read_model_config
    from speechssl.train.checkpoint import load_checkpoint

    arch = read_model_config(load_checkpoint(pretrained), pretrained)
    out = []
    for f in dataclasses.fields(ModelConfig):
        if f.name in FINETUNE_FIELDS:
            continue
        value = getattr(arch, f.name)
        if f.name == "conv_feature_layers":
            text = conv_layers_literal(value)
        elif isinstance(value, (list, tuple)):
            text = json.dumps(list(value))
        elif value is None:
            text = "null"
        elif isinstance(value, bool):
            text = "true" if value else "false"
        else:
            text = str(value)
        out.append(f"model.{f.name}={text}")
    return out


def run_finetunings(args, work: Path, runs: dict[str, list[str]]) -> dict[str, float]:
    """Fine-tune every run (in turn, or all at once with ``--parallel``); return wall minutes per run."""
    common = [f"task.data={args.labeled}", f"optimization.max_update={args.updates}", "common.log_format=simple",
              *args.finetune_override]
    minutes = {}
    if not args.parallel:
        for name, extra in runs.items():
            t = time.time()
            speechssl("finetune", args.finetune_recipe, *common, *extra)
            minutes[name] = (time.time() - t) / 60
        return minutes
    t, procs = time.time(), {}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    for name, extra in runs.items():
        log = work / f"ft_{name}.log"
        print(f"+ speechssl finetune {args.finetune_recipe} ... ({name}; log: {log})", flush=True)
        with open(log, "a") as fh:
            procs[name] = subprocess.Popen([sys.executable, "-m", "speechssl", "finetune", args.finetune_recipe,
                                            *common, *extra], cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
    for name, proc in procs.items():
        if proc.wait() != 0:
            raise SystemExit(f"fine-tuning '{name}' failed (exit {proc.returncode}); see {work / f'ft_{name}.log'}")
        minutes[name] = (time.time() - t) / 60
    return minutes


def main(argv=None) -> int:
    args = parse_args(argv)
    os.chdir(ROOT)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    # 1. pretraining (or given checkpoints)
    upstreams: dict[str, Path] = {}
    for item in args.pretrained:
        name, _, path = item.rpartition("=")
        upstreams[name or "pretrained"] = Path(path).expanduser()
    if not upstreams:
        speechssl("pretrain", args.pretrain_recipe, f"task.data={args.unlabeled}",
                  f"checkpoint.save_dir={work / 'pretrain'}", f"optimization.max_update={args.pretrain_updates}",
                  "common.log_format=simple", *args.pretrain_override)
        upstreams["pretrained"] = work / "pretrain" / "checkpoint_best.pt"
    if "scratch" in upstreams:
        raise SystemExit("--pretrained: the name 'scratch' is taken by the from-scratch run")
    pretrain_minutes = (time.time() - t0) / 60
    # 2./3. fine-tuning: every upstream, and the first one's architecture from scratch
    runs = {name: [f"model.w2v_path={path}", f"checkpoint.save_dir={work / f'ft_{name}'}", *args.pretrained_override]
            for name, path in upstreams.items()}
    first = next(iter(upstreams.values()))
    runs["scratch"] = [*arch_overrides(first), "model.w2v_path=null", "model.feature_grad_mult=1.0",
                       "model.freeze_finetune_updates=0", f"checkpoint.save_dir={work / 'ft_scratch'}",
                       *args.scratch_override]
    minutes = run_finetunings(args, work, runs)
    # 4. the best (valid WER) checkpoint of every run on the held-out speakers
    from speechssl.tasks.ctc_eval import evaluate_ctc
    from speechssl.utils.io import atomic_write_text

    results = {}
    for name in runs:
        ckpt = work / f"ft_{name}" / "checkpoint_best.pt"
        results[name] = evaluate_ctc(ckpt, args.labeled, args.split, work / f"eval_{name}_{args.split}",
                                     force=True, quiet=True)
        results[name]["valid"] = evaluate_ctc(ckpt, args.labeled, "valid", quiet=True)
    scr = results["scratch"]
    rows = [f"| model ({args.updates} CTC updates, {args.labeled}) | {args.split} WER % | {args.split} CER % | "
            f"WER vs scratch | CER vs scratch | valid WER % | valid CER % |", "|---|---|---|---|---|---|---|"]
    target = {}
    for name in runs:
        r = results[name]
        label = "from scratch (same architecture)" if name == "scratch" else f"pretrained: {name} ({upstreams[name]})"
        wr = r["wer"] / scr["wer"] if scr["wer"] else float("nan")
        cr = r["cer"] / scr["cer"] if scr["cer"] else float("nan")
        if name != "scratch":
            target[name] = wr <= 0.6 and cr <= 0.6
        rows.append(f"| {label} | {r['wer']:.1f} | {r['cer']:.1f} | {wr:.2f}x | {cr:.2f}x | "
                    f"{r['valid']['wer']:.1f} | {r['valid']['cer']:.1f} |")
    table = "\n".join(rows) + "\n"
    import yaml

    metric = yaml.safe_load((work / "ft_scratch" / "config.yaml").read_text())["checkpoint"]["best_checkpoint_metric"]
    times = ", ".join(f"{k} {v:.1f} min" for k, v in minutes.items())
    notes = (f"\n{args.split}: {scr['num_utterances']} utterances of held-out speakers, greedy decoding, best "
             f"checkpoint by valid {metric.upper()}. Wall time: pretraining {pretrain_minutes:.1f} min; fine-tuning {times}"
             f"{' (in parallel)' if args.parallel else ''}. Target (pretrained WER and CER <= 0.6x scratch): "
             + ", ".join(f"{k} {'met' if v else 'NOT met'}" for k, v in target.items()) + ".\n")
    out = Path(args.table) if args.table else work / "results.md"
    atomic_write_text(out, table + notes)
    atomic_write_text(work / "results.json", json.dumps(
        {"results": results, "target_met": target, "minutes": {"pretrain": pretrain_minutes, **minutes},
         "command": sys.argv}, indent=2, default=str) + "\n")
    print("\n" + table + notes + f"(written to {out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
