#!/usr/bin/env python
"""Does self-supervised pretraining help? The README's table, measured end to end on the demo corpus.

For every seed, with the same budget for every row:

1. pretrain each objective on the unlabeled pool (``--objectives``): wav2vec 2.0 (``recipes/wav2vec2_mel_tiny.yaml``)
   and HuBERT, both iterations (iteration-1 labels: k-means of per-utterance standardized MFCCs, shared by
   the seeds; ``recipes/hubert_mel_tiny.yaml``; iteration-2 labels: k-means of a layer of the seed's
   iteration-1 model; ``recipes/hubert_mel_tiny_iter2.yaml``), and, when asked for, data2vec 2.0
   (``recipes/data2vec2_tiny.yaml``; ``--objectives wav2vec2,hubert,data2vec2``);
2. fine-tune every upstream with CTC on the 10 labeled minutes (``recipes/ctc_mel_tiny.yaml``) and train the same
   architecture from scratch with the same recipe and updates; the best checkpoint on valid (dev speakers) is
   scored on test (held-out speakers never seen in pretraining or fine-tuning);
3. probe every upstream frozen (``speechssl probe``): ASR (BiLSTM + CTC on the same 10 minutes) and speaker
   ID across recording sessions, against the FBANK baseline and the same architecture randomly initialised.

Every step is a ``speechssl`` command in its own process; re-running the same command skips finished steps
(and resumes an interrupted training), so it can be stopped and continued. With ``--jobs 2`` two steps run at a
time, one thread each (pretraining too: these tiny models are as fast on one thread as on two), and the
baselines that need no pretrained weights (CTC from scratch, the FBANK and random-init probes) start beside
the first pretraining: a wav2vec 2.0 or data2vec 2.0 architecture is read from its recipe. Results: ``WORK/results.json``
and the Markdown table ``WORK/results.md`` (mean +- standard deviation over the seeds).

    python tools/experiment_pretraining.py                       # 3 seeds, both objectives (~3-4 h, 2 cores)
    python tools/experiment_pretraining.py --seeds 1 --jobs 2    # one seed, two jobs at a time (the demo)
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
DEMO = Path(os.environ.get("SPEECHSSL_DEMO_DIR", Path.home() / ".cache/speechssl/demo"))
OBJECTIVES = ("wav2vec2", "hubert", "data2vec2")
DEFAULT_OBJECTIVES = ("wav2vec2", "hubert")
RECIPES = {"wav2vec2": "recipes/wav2vec2_mel_tiny.yaml", "data2vec2": "recipes/data2vec2_tiny.yaml"}
CTC_RECIPE = "recipes/ctc_mel_tiny.yaml"


@functools.lru_cache(maxsize=None)
def recipe_ctc_lr() -> float:
    """The CTC recipe's learning rate (read once: every run folder name asks for it)."""
    from speechssl.config import load_config

    lr = load_config(ROOT / CTC_RECIPE).optimization.lr
    return float(lr[0] if isinstance(lr, (list, tuple)) else lr)


def ctc_lrs(args) -> list[float]:
    """The CTC learning rates to try (``--ctc-lrs``), the recipe's when none is given."""
    try:
        lrs = [float(x) for x in args.ctc_lrs.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"--ctc-lrs {args.ctc_lrs!r}: expected comma-separated numbers, e.g. 5e-4,2e-4") from None
    return lrs or [recipe_ctc_lr()]


def lr_suffix(lr: float) -> str:
    """Run folders: ``ctc_NAME`` at the recipe's learning rate (as before the option), ``ctc_NAME_lr2e-04``."""
    return "" if lr == recipe_ctc_lr() else f"_lr{lr:.0e}"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", type=Path, default=DEMO / "corpus", help="demo corpus (speechssl corpus builds it)")
    p.add_argument("--manifests", type=Path, default=ROOT / "manifests/demo",
                   help="manifest folders: unlabeled/, labeled_10min/, speaker_id/ (built from --corpus if missing)")
    p.add_argument("--work", type=Path, default=DEMO / "runs/experiment", help="every run, probe and the results")
    p.add_argument("--seeds", default="1,2,3", help="comma-separated seeds (pretraining, fine-tuning and probes)")
    p.add_argument("--objectives", default=",".join(DEFAULT_OBJECTIVES),
                   help=f"comma-separated subset of {OBJECTIVES}")
    p.add_argument("--jobs", type=int, default=1,
                   help="steps run at once, each with 2/JOBS threads (pretraining too: these tiny models run "
                        "as fast on one thread as on two, so two jobs do twice the work); k-means runs alone")
    p.add_argument("--ctc-updates", type=int, default=0, help="CTC fine-tuning updates (0: the recipe's)")
    p.add_argument("--ctc-lrs", default="",
                   help="comma-separated CTC learning rates (default: the recipe's): every row (scratch too) is "
                        "fine-tuned with each, and each row reports the one with the lowest valid CER, mean over "
                        "the seeds")
    p.add_argument("--ctc-override", action="append", default=[], metavar="[ROW:]KEY=VALUE",
                   help="extra fine-tuning setting (repeatable) for every CTC run, scratch too, or with ROW: (an "
                        "objective or scratch) for that row's runs only, e.g. scratch:model.apply_mask=true; give "
                        "the changed experiment its own --work: finished runs are not redone")
    p.add_argument("--probe-updates", type=int, default=0, help="ASR probe updates (0: speechssl probe's default)")
    p.add_argument("--no-probes", action="store_true", help="fine-tuning rows only")
    p.add_argument("--probe-seeds", default="", help="comma-separated seeds that are probed (default: every seed)")
    p.add_argument("--objective-seeds", action="append", default=[], metavar="OBJECTIVE=SEEDS",
                   help="run OBJECTIVE only for these seeds (repeatable), e.g. wav2vec2=1 to spend the budget on "
                        "HuBERT's spread; the table gives the number of seeds behind every cell")
    p.add_argument("--override", action="append", default=[], metavar="OBJECTIVE:KEY=VALUE",
                   help="extra pretraining override for one objective (repeatable), e.g. wav2vec2:optimization.lr=1e-3")
    return p.parse_args(argv)


# --------------------------------------------------------------------------------------------------
# Steps: commands with an output that marks them finished
# --------------------------------------------------------------------------------------------------


@dataclass
class Step:
    name: str
    cmd: list[str]
    done: Path  # exists when the step is finished
    log: Path
    alone: bool = False  # run with both cores, nothing beside it (k-means labels)
    # a training: ``done`` (a checkpoint) also exists when it was interrupted, so the command always runs;
    # the trainer resumes it, or says there is nothing to do and exits
    resumable: bool = False
    after: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)


def speechssl(*args: str) -> list[str]:
    return [sys.executable, "-m", "speechssl", *map(str, args)]


def run_step(step: Step, threads: int) -> float:
    if step.done.exists() and not step.resumable:
        return 0.0
    step.log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE", **step.env}
    t = time.perf_counter()
    print(f"[{time.strftime('%H:%M:%S')}] {step.name} (log: {step.log})", flush=True)
    with open(step.log, "a") as fh:
        proc = subprocess.run(step.cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise SystemExit(f"step '{step.name}' failed (exit {proc.returncode}); see {step.log}")
    if not step.done.exists():
        raise SystemExit(f"step '{step.name}' finished without writing {step.done}; see {step.log}")
    return time.perf_counter() - t


def run_steps(steps: list[Step], jobs: int) -> dict[str, float]:
    """Run ``steps`` respecting ``after``; steps marked ``alone`` never overlap another step."""
    finished = {s.name for s in steps if s.done.exists() and not s.resumable}
    seconds = {name: 0.0 for name in finished}
    pending = [s for s in steps if s.name not in finished]  # a finished step (alone or not) holds nothing up
    with concurrent.futures.ThreadPoolExecutor(max(1, jobs)) as pool:
        running: dict[concurrent.futures.Future, Step] = {}
        while pending or running:
            ready = [s for s in pending if all(a in finished for a in s.after)]
            alone_running = any(s.alone for s in running.values())
            for s in ready:
                if alone_running or (s.alone and running) or len(running) >= max(1, jobs):
                    break
                pending.remove(s)
                threads = 2 if s.alone or jobs == 1 else max(1, 2 // jobs)
                running[pool.submit(run_step, s, threads)] = s
                alone_running = s.alone
            if not running:
                raise SystemExit(f"steps wait for each other: {[s.name for s in pending]}")
            done, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in done:
                s = running.pop(future)
                seconds[s.name] = future.result()
                finished.add(s.name)
    return seconds


# --------------------------------------------------------------------------------------------------
# The experiment
# --------------------------------------------------------------------------------------------------


def manifests(args) -> dict[str, Path]:
    """The three manifest folders, built from the corpus when missing."""
    m = {"unlabeled": args.manifests / "unlabeled", "labeled": args.manifests / "labeled_10min",
         "sid": args.manifests / "speaker_id"}
    c = args.corpus
    if not (m["unlabeled"] / "train.tsv").is_file():
        subprocess.run(speechssl("manifest", c / "pool", "--out", m["unlabeled"], "--add-split", f"valid={c / 'dev'}",
                                 "--force", "--quiet"), check=True, cwd=ROOT)
    if not (m["labeled"] / "test.tsv").is_file():
        subprocess.run(speechssl("manifest", c / "train", "--out", m["labeled"], "--train-seconds", "600",
                                 "--add-split", f"valid={c / 'dev'}", "--add-split", f"test={c / 'test'}",
                                 "--require-transcripts", "--force", "--quiet"), check=True, cwd=ROOT)
    if not (m["sid"] / "test.spk").is_file():
        whole = args.work / "manifests" / "train_all"
        subprocess.run(speechssl("manifest", c / "train", "--out", whole, "--valid-percent", "0", "--force",
                                 "--quiet"), check=True, cwd=ROOT)
        from speechssl.tasks.speaker_id import make_cross_session_manifest

        make_cross_session_manifest(whole, m["sid"], force=True)
    return m


def ctc_overrides(items: list[str]) -> dict[str, list[str]]:
    """``--ctc-override`` items by row: ``""`` (every row) or an objective or ``scratch`` -> ``KEY=VALUE``s."""
    out: dict[str, list[str]] = {}
    for item in items:
        key, eq, _ = item.partition("=")
        row, colon, key = key.rpartition(":") if ":" in key else ("", "", key)
        if not eq or not key or (colon and row not in (*OBJECTIVES, "scratch")):
            raise SystemExit(f"--ctc-override {item!r}: expected [ROW:]KEY=VALUE with ROW one of "
                             f"{', '.join((*OBJECTIVES, 'scratch'))}, e.g. scratch:model.apply_mask=true")
        out.setdefault(row, []).append(item[len(row) + len(colon):])
    return out


def plan(args, man: dict[str, Path]) -> tuple[list[Step], dict[str, dict[str, Path]]]:
    """Every step of the experiment, and per seed the upstream checkpoints (name -> path)."""
    work = args.work
    steps: list[Step] = []
    probe_steps: list[Step] = []  # run after every seed's pretraining and fine-tuning
    upstreams: dict[str, dict[str, Path]] = {}
    over: dict[str, list[str]] = {}
    for item in args.override:
        objective, _, kv = item.partition(":")
        over.setdefault(objective, []).append(kv)
    ctc_over = ctc_overrides(args.ctc_override)
    objectives = [o for o in args.objectives.split(",") if o]
    only: dict[str, set[int]] = {}
    for item in args.objective_seeds:
        objective, sep, seeds = item.partition("=")
        if not sep or objective not in OBJECTIVES:
            raise SystemExit(f"--objective-seeds {item!r}: expected OBJECTIVE=SEEDS with OBJECTIVE in {OBJECTIVES}")
        only[objective] = {int(x) for x in seeds.split(",") if x}
    probe_seeds = {int(x) for x in args.probe_seeds.split(",") if x}
    hub_labels = work / "hubert_labels"
    if "hubert" in objectives:
        steps.append(Step("hubert labels it1", ["bash", str(ROOT / "tools/hubert_labels.sh"), str(man["unlabeled"]),
                                                str(hub_labels)],
                          hub_labels / "it1/labels/valid.km", work / "logs/hubert_labels_it1.log",
                          alone=True, env={"CMVN": "1", "K": "100"}))
    for seed in [int(s) for s in args.seeds.split(",") if s]:
        d = work / f"seed{seed}"
        ups = upstreams.setdefault(str(seed), {})
        common = [f"common.seed={seed}", "common.log_format=simple"]
        wanted = [o for o in objectives if seed in only.get(o, {seed})]
        for name in ("wav2vec2", "data2vec2"):  # one pretraining each, no labels
            if name not in wanted:
                continue
            run = d / name
            steps.append(Step(f"s{seed} pretrain {name}", speechssl(
                "pretrain", RECIPES[name], f"task.data={man['unlabeled']}",
                f"checkpoint.save_dir={run}", *common, *over.get(name, [])),
                run / "checkpoint_last.pt", d / f"logs/pretrain_{name}.log", resumable=True))
            ups[name] = run / "checkpoint_last.pt"
        if "hubert" in wanted:
            it1, it2 = d / "hubert_it1", d / "hubert_it2"
            steps.append(Step(f"s{seed} pretrain hubert it1", speechssl(
                "pretrain", "recipes/hubert_mel_tiny.yaml", f"task.data={man['unlabeled']}",
                f"task.label_dir={hub_labels / 'it1/labels'}", f"checkpoint.save_dir={it1}", *common,
                *over.get("hubert", [])), it1 / "checkpoint_last.pt", d / "logs/pretrain_hubert_it1.log",
                after=["hubert labels it1"], resumable=True))
            steps.append(Step(f"s{seed} hubert labels it2", [
                "bash", str(ROOT / "tools/hubert_labels.sh"), str(man["unlabeled"]), str(d / "hubert_labels"),
                str(it1 / "checkpoint_last.pt")], d / "hubert_labels/it2/labels/valid.km",
                d / "logs/hubert_labels_it2.log", alone=True, after=[f"s{seed} pretrain hubert it1"],
                env={"LAYER": "4", "K": "100"}))
            steps.append(Step(f"s{seed} pretrain hubert it2", speechssl(
                "pretrain", "recipes/hubert_mel_tiny_iter2.yaml", f"task.data={man['unlabeled']}",
                f"task.label_dir={d / 'hubert_labels/it2/labels'}", f"checkpoint.save_dir={it2}", *common,
                *over.get("hubert", [])), it2 / "checkpoint_last.pt", d / "logs/pretrain_hubert_it2.log",
                after=[f"s{seed} hubert labels it2"], resumable=True))
            ups["hubert"] = it2 / "checkpoint_last.pt"
        pre = {name: [s.name for s in steps if s.done == path] for name, path in ups.items()}
        ctc = [f"task.data={man['labeled']}", *common] + (
            [f"optimization.max_update={args.ctc_updates}"] if args.ctc_updates else []) + ctc_over.get("", [])
        # the from-scratch row and the random-init probe use HuBERT's architecture when it is trained
        # (the encoders are the same; HuBERT's has no quantizer), else the first upstream's: read from its
        # recipe, so both baselines run beside the pretraining instead of after it (HuBERT's, and one whose
        # pretraining overrides model keys, from the pretrained checkpoint)
        arch = "hubert" if "hubert" in ups else next(iter(ups))
        first, arch_after = ups[arch], pre[arch]
        if arch in RECIPES and not any(kv.startswith("model.") for kv in over.get(arch, [])):
            first, arch_after = RECIPES[arch], []
        for lr in ctc_lrs(args):
            sfx = lr_suffix(lr)
            lr_over = [f"optimization.lr=[{lr}]"] if sfx else []
            runs = {name: ([f"model.w2v_path={path}"], pre[name]) for name, path in ups.items()}
            runs["scratch"] = ([f"model.w2v_path={first}", "model.no_pretrained_weights=true",
                                "model.freeze_finetune_updates=0"], arch_after)
            for name, (model_args, after) in runs.items():
                run = d / f"ctc_{name}{sfx}"
                steps.append(Step(f"s{seed} ctc {name}{sfx}", speechssl(
                    "finetune", CTC_RECIPE, *model_args, f"checkpoint.save_dir={run}", *ctc,
                    *ctc_over.get(name, []), *lr_over),
                    run / "checkpoint_best.pt", d / f"logs/ctc_{name}{sfx}.log", after=after, resumable=True))
                for split in ("valid", "test"):
                    steps.append(Step(f"s{seed} eval {name}{sfx} {split}", speechssl(
                        "evaluate", run / "checkpoint_best.pt", man["labeled"], "--split", split, "--out",
                        d / f"eval_{name}{sfx}_{split}", "--force"), d / f"eval_{name}{sfx}_{split}/report.json",
                        d / f"logs/eval_{name}{sfx}_{split}.log", after=[f"s{seed} ctc {name}{sfx}"]))
        if args.no_probes or (probe_seeds and seed not in probe_seeds):
            continue
        probes = {**{name: ([str(path)], pre[name]) for name, path in ups.items()},
                  "fbank": (["fbank"], []),
                  "random": ([str(first), "--random-init"], arch_after)}
        for name, (upstream, after) in probes.items():
            for task, data in (("asr", man["labeled"]), ("sid", man["sid"])):
                extra = ["--updates", str(args.probe_updates)] if task == "asr" and args.probe_updates else []
                out = d / f"probe_{task}_{name}"
                probe_steps.append(Step(f"s{seed} probe {task} {name}", speechssl(
                    "probe", *upstream, data, "--task", task, "--seed", str(seed), "--out", out, "--force", *extra),
                    out / "probe.json", d / f"logs/probe_{task}_{name}.log", after=after))
    return steps + probe_steps, upstreams


def mean_std(values: list[float], seeds: int = 0) -> str:
    """``mean ± std`` over the seeds; a cell measured on fewer seeds than the table's says how many."""
    if not values:
        return "-"
    n = f" (n={len(values)})" if seeds and len(values) < seeds else ""
    if len(values) == 1:
        return f"{values[0]:.1f}{n}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}{n}"


def collect(args, upstreams: dict[str, dict[str, Path]]) -> dict:
    """Per seed and row: CTC test/valid WER and CER, probe ASR CER (test) and SID accuracy (test)."""
    rows: dict[str, dict[str, list[float]]] = {}

    def add(row: str, key: str, value: Optional[float]) -> None:
        if value is not None:
            rows.setdefault(row, {}).setdefault(key, []).append(value)

    def read(path: Path) -> Optional[dict]:
        return json.loads(path.read_text()) if path.is_file() else None

    lrs = ctc_lrs(args)
    names = list(dict.fromkeys(n for ups in upstreams.values() for n in [*ups, "scratch"]))
    for name in names:
        # per learning rate: {seed: report} of the valid and test evaluations
        evals = {lr: {split: {seed: read(args.work / f"seed{seed}/eval_{name}{lr_suffix(lr)}_{split}/report.json")
                              for seed in upstreams} for split in ("valid", "test")} for lr in lrs}
        valid_cer = {lr: [r["cer"] for r in e["valid"].values() if r] for lr, e in evals.items()}
        measured = [lr for lr in lrs if valid_cer[lr]]
        if not measured:
            continue
        # selection on valid: the learning rate with the lowest mean valid CER over the seeds
        best = min(measured, key=lambda lr: statistics.mean(valid_cer[lr]))
        rows.setdefault(name, {})["ctc_lr"] = best
        rows[name]["ctc_valid_cer_by_lr"] = {f"{lr:g}": round(statistics.mean(v), 2)
                                             for lr, v in valid_cer.items() if v}
        for split in ("test", "valid"):
            for seed, r in evals[best][split].items():
                if r:
                    add(name, f"ctc_{split}_wer", r["wer"])
                    add(name, f"ctc_{split}_cer", r["cer"])
                    if split == "test":  # the ratio to scratch pairs the rows of one seed
                        rows[name].setdefault("ctc_test_cer_by_seed", {})[seed] = r["cer"]
    for seed, ups in upstreams.items():
        d = args.work / f"seed{seed}"
        for name in [*ups, "fbank", "random"]:
            r = read(d / f"probe_asr_{name}/probe.json")
            if r:
                add(name, "probe_asr_cer", r["test_cer"])
                add(name, "probe_asr_valid_cer", r["valid_cer"])
            r = read(d / f"probe_sid_{name}/probe.json")
            if r:
                add(name, "probe_sid_acc", r["test_accuracy"])
    return rows


LABELS = {"wav2vec2": "wav2vec 2.0 (log-mel tiny)", "hubert": "HuBERT iteration 2 (log-mel tiny)",
          "data2vec2": "data2vec 2.0 (log-mel tiny)",
          "scratch": "from scratch (same architecture)", "fbank": "FBANK (80-d log-mel)",
          "random": "same architecture, random init"}


def table(rows: dict, seeds: int, ctc_over: Optional[dict[str, list[str]]] = None) -> str:
    """The Markdown table; ``ctc_over`` (:func:`ctc_overrides`): the fine-tuning settings beyond the recipe, listed
    under it (a row fine-tuned differently from the others says so)."""
    out = [f"| upstream (mean ± std over {seeds} seed{'s' if seeds > 1 else ''}) | CTC lr | CTC test WER % | "
           "CTC test CER % | CER vs scratch | probe ASR test CER % | probe SID test accuracy % |",
           "|---|---|---|---|---|---|---|"]
    scratch = rows.get("scratch", {}).get("ctc_test_cer_by_seed", {})
    for name in [*[k for k in rows if k in OBJECTIVES], "scratch", "fbank", "random"]:
        r = rows.get(name, {})
        ratio = "-"
        if name in OBJECTIVES and r.get("ctc_test_cer_by_seed") and scratch:
            ratios = [cer / scratch[seed] for seed, cer in r["ctc_test_cer_by_seed"].items() if seed in scratch]
            if ratios:
                ratio = f"{statistics.mean(ratios):.2f}x"
        cells = [mean_std(r.get(k, []), seeds) for k in ("ctc_test_wer", "ctc_test_cer")]
        probes = [mean_std(r.get(k, []), seeds) for k in ("probe_asr_cer", "probe_sid_acc")]
        lr = f"{r['ctc_lr']:g}" if "ctc_lr" in r else "-"
        out.append(f"| {LABELS[name]} | {lr} | {cells[0]} | {cells[1]} | {ratio} | {probes[0]} | {probes[1]} |")
    for row, kvs in (ctc_over or {}).items():
        out.append(f"\nCTC settings beyond {CTC_RECIPE}, {'every row' if not row else LABELS[row]}: {' '.join(kvs)}")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    os.chdir(ROOT)
    sys.path.insert(0, str(ROOT))
    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    man = manifests(args)
    steps, upstreams = plan(args, man)
    seconds = run_steps(steps, args.jobs)
    rows = collect(args, upstreams)
    text = table(rows, len(upstreams), ctc_overrides(args.ctc_override))
    minutes = {name: round(s / 60, 2) for name, s in seconds.items() if s}
    from speechssl.utils.io import atomic_write_text

    atomic_write_text(args.work / "results.json", json.dumps(
        {"rows": rows, "step_minutes": minutes, "seeds": list(upstreams), "command": sys.argv,
         "wall_minutes": round((time.perf_counter() - t0) / 60, 2)}, indent=1) + "\n")
    atomic_write_text(args.work / "results.md", text)
    print("\n" + text + f"\n(written to {args.work / 'results.md'}; wall time {(time.perf_counter() - t0) / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
