"""Speaker-ID experiment on the demo corpus: what does pretraining buy a frozen upstream?

Four runs with the same head, data, crops and seed (the README's speaker-ID table):

1. frozen pretrained upstream (SUPERB protocol, ``recipes/speaker_id_frozen.yaml``);
2. frozen randomly initialised upstream of the same architecture (``model.no_pretrained_weights=true``);
3. full fine-tuning of the pretrained upstream (``recipes/speaker_id_finetune.yaml``);
4. the same full fine-tuning from the random initialisation.

Data: the demo corpus's 24 training speakers, split closed-set (every speaker in all three splits) with
:func:`speechssl.tasks.speaker_id.make_closed_set_manifest` into train / valid (best checkpoint) / test
(reported). Each run is ``speechssl finetune`` in its own process (re-running resumes or skips finished
runs), then ``checkpoint_best.pt`` is scored on the test split (accuracy, top-5, cosine EER).

    bash tools/demo.sh                       # corpus + tiny wav2vec 2.0 pretraining, if not done yet
    python tools/experiment_speaker_id.py    # ~20 min on 2 CPU cores; prints a Markdown table
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

DEMO = Path(os.environ.get("SPEECHSSL_DEMO_DIR", Path.home() / ".cache/speechssl/demo"))
REPO = Path(__file__).resolve().parent.parent


def run(cmd: list[str], log: Path) -> float:
    """Run ``cmd`` with its output appended to ``log``; return the wall time; raise on failure."""
    t0 = time.perf_counter()
    with open(log, "a") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO,
                              env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    if proc.returncode:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}; see {log}")
    return time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", type=Path, default=DEMO / "corpus", help="demo corpus (tools/demo.sh builds it)")
    p.add_argument("--upstream", type=Path, default=DEMO / "runs/demo/seed1/wav2vec2/checkpoint_last.pt",
                   help="pretrained checkpoint (wav2vec 2.0 or HuBERT)")
    p.add_argument("--manifest", type=Path, default=REPO / "manifests/demo/speaker_id_experiment",
                   help="where the train / valid / test split is written")
    p.add_argument("--out", type=Path, default=DEMO / "runs/speaker_id", help="run folders and results.json")
    p.add_argument("--frozen-updates", type=int, default=600)
    p.add_argument("--finetune-updates", type=int, default=600)
    p.add_argument("--valid-fraction", type=float, default=0.15)
    p.add_argument("--test-fraction", type=float, default=0.25)
    p.add_argument("--eer-trials", type=int, default=4000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--restart", action="store_true", help="delete earlier runs in --out and train again")
    args = p.parse_args()

    from speechssl.tasks.speaker_id import make_closed_set_manifest
    from speechssl.tasks.speaker_id_eval import evaluate_speaker_id

    if not args.upstream.is_file():
        raise SystemExit(f"{args.upstream}: not found; run 'bash tools/demo.sh' first (it pretrains it)")
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "experiment.log"
    py = sys.executable

    # 1. closed-set manifest of the demo corpus's training speakers
    pool = args.out / "pool"
    run([py, "-m", "speechssl", "manifest", str(args.corpus / "train"), "--out", str(pool), "--valid-percent", "0",
         "--force", "--quiet"], log)
    sizes = make_closed_set_manifest(pool, args.manifest, args.valid_fraction, args.test_fraction, seed=42, force=True)
    print(f"manifest {args.manifest}: " + ", ".join(f"{k} {v}" for k, v in sizes.items()) + " utterances")

    random = ["model.no_pretrained_weights=true"]
    runs = [
        ("frozen", "pretrained", "speaker_id_frozen.yaml", args.frozen_updates, []),
        ("frozen", "random init", "speaker_id_frozen.yaml", args.frozen_updates, random),
        ("full fine-tuning", "pretrained", "speaker_id_finetune.yaml", args.finetune_updates, []),
        ("full fine-tuning", "random init", "speaker_id_finetune.yaml", args.finetune_updates, random),
    ]
    rows = []
    for mode, init, recipe, updates, extra in runs:
        name = f"{mode.split()[0]}_{init.split()[0]}"
        save = args.out / name
        cmd = [py, "-m", "speechssl", "finetune", f"recipes/{recipe}", f"task.data={args.manifest}",
               f"model.w2v_path={args.upstream}", f"checkpoint.save_dir={save}", f"optimization.max_update={updates}",
               f"common.seed={args.seed}", "common.log_format=simple", *extra]
        if args.restart:
            cmd += ["--restart", "--force"]
        print(f"== {name}: {' '.join(cmd[2:])}", flush=True)
        run(cmd, log)
        records = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
        train = [r for r in records if r.get("split") == "train"]  # training time from the logs (also on re-runs)
        span = max(1, train[-1]["update"] - train[0]["update"])
        seconds = (train[-1]["time"] - train[0]["time"]) * train[-1]["update"] / span
        valid = [r for r in records if r.get("split") == "valid"]
        best = max(valid, key=lambda r: r["accuracy"])
        evaluation = argparse.Namespace(max_tokens=None, eer_trials=args.eer_trials, eer_split=None, eer_seed=0,
                                        force=True)
        report = evaluate_speaker_id(save / "checkpoint_best.pt", args.manifest, "test", save / "eval_test",
                                     device="cpu", batch_size=1, extra=evaluation)
        rows.append({"mode": mode, "upstream": init, "updates": updates, "minutes": round(seconds / 60, 1),
                     "best_update": best["update"], "valid_accuracy": round(100 * best["accuracy"], 1),
                     "test_accuracy": report["accuracy"], "test_top5": report["top5_accuracy"],
                     "test_eer": report["eer"], "test_utterances": report["num_utterances"], "run": str(save)})

    (args.out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(f"\nupstream: {args.upstream}; {sizes['train']} train / {sizes['valid']} valid / {sizes['test']} test "
          "utterances of 24 speakers (chance 4.2%)\n")
    print("| upstream | mode | updates | minutes | valid acc. (best) | test acc. | test top-5 | test EER |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['upstream']} | {r['mode']} | {r['updates']} | {r['minutes']} | {r['valid_accuracy']}% "
              f"(update {r['best_update']}) | {r['test_accuracy']:.1f}% | {r['test_top5']:.1f}% "
              f"| {r['test_eer']:.1f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
