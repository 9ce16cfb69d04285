"""``speechssl probe``: frozen-upstream probes (SUPERB style); the work is in :mod:`speechssl.tasks.probe`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from speechssl.utils.args import NON_NEGATIVE, POSITIVE, number

DESCRIPTION = """\
Train a small downstream on a FROZEN upstream's hidden states (SUPERB's protocol: a learnable softmax-
weighted sum of the Transformer input and every layer's output) and score it:

  asr  BiLSTM + CTC on the letters of <split>.ltr; WER / CER of greedy decoding (best checkpoint by
       valid CER, then scored once on --test-split);
  sid  mean pooling + linear over the speakers of dict.spk.txt; accuracy (best by valid accuracy).

UPSTREAM is a speechssl checkpoint (pretraining or fine-tuned), or 'fbank' for the 80-d log-mel
baseline (two frames stacked: 20 ms, the models' frame rate; as it is and standardized per utterance, the
featurizer weighs both); --random-init probes the checkpoint's
architecture with fresh weights (the "same upstream, untrained" baseline; UPSTREAM may then be the
pretraining recipe instead of a checkpoint). The upstream runs once per
utterance; the downstream trains on the cached states, so a probe takes seconds (sid) to minutes (asr).
Writes --out/probe.json (scores, layer weights, curve) and, for asr, the test hypotheses.

examples:
  speechssl probe runs/w2v/checkpoint_best.pt manifests/demo/labeled_10min --task asr --out runs/probe_asr
  speechssl probe fbank manifests/demo/labeled_10min --task asr
  speechssl probe runs/w2v/checkpoint_best.pt manifests/demo/speaker_id --task sid --random-init
  speechssl probe recipes/data2vec2_tiny.yaml manifests/demo/speaker_id --task sid --random-init
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    from speechssl.tasks.probe import ProbeConfig, TASKS

    d = ProbeConfig()
    p.add_argument("upstream", metavar="UPSTREAM",
                   help="speechssl checkpoint, or 'fbank' (with --random-init: or a pretraining recipe)")
    p.add_argument("manifest_dir", metavar="MANIFEST_DIR",
                   help="splits with .ltr/.wrd (asr) or .spk + dict.spk.txt (sid) labels")
    p.add_argument("--task", choices=TASKS, required=True)
    p.add_argument("--random-init", action="store_true",
                   help="the checkpoint's (or recipe's) architecture, untrained weights")
    p.add_argument("--out", type=Path, help="write probe.json (and asr hypotheses) here")
    p.add_argument("--force", action="store_true", help="replace an existing --out/probe.json")
    p.add_argument("--updates", type=NON_NEGATIVE, default=0, help="downstream updates (0: 1500 asr, 600 sid)")
    p.add_argument("--lr", type=number(0), default=0.0, help="downstream learning rate (0: 2e-3 asr, 1e-2 sid)")
    p.add_argument("--batch-size", type=POSITIVE, default=d.batch_size, help="asr: utterances per update")
    p.add_argument("--hidden", type=POSITIVE, default=d.hidden, help="asr: LSTM units per direction")
    p.add_argument("--lstm-layers", type=NON_NEGATIVE, default=d.lstm_layers,
                   help="asr: BiLSTM layers; 0: a linear CTC head (fast; for upstreams with context, not fbank)")
    p.add_argument("--eval-interval", type=POSITIVE, default=d.eval_interval, help="updates between validations")
    p.add_argument("--seed", type=NON_NEGATIVE, default=d.seed, help="downstream (and --random-init) seed")
    p.add_argument("--train-split", default=d.train_split)
    p.add_argument("--valid-split", default=d.valid_split)
    p.add_argument("--test-split", default=d.test_split, help="'none': report valid only")
    p.add_argument("--device", default="cpu", help="where the upstream runs (the downstream is small: CPU)")


def run(args: argparse.Namespace) -> int:
    from speechssl.data.dataset import ManifestError
    from speechssl.tasks.probe import ProbeConfig, load_upstream, run_probe
    from speechssl.text.vocab import VocabError
    from speechssl.train.checkpoint import CheckpointError
    from speechssl.utils.io import atomic_write_text

    out_file = args.out / "probe.json" if args.out else None
    if out_file is not None and out_file.exists() and not args.force:
        print(f"speechssl probe: {out_file} exists; add --force to replace it", file=sys.stderr)
        return 2
    cfg = ProbeConfig(task=args.task, updates=args.updates, lr=args.lr, batch_size=args.batch_size,
                      hidden=args.hidden, lstm_layers=args.lstm_layers, eval_interval=args.eval_interval,
                      seed=args.seed,
                      train_split=args.train_split, valid_split=args.valid_split,
                      test_split=None if args.test_split in (None, "none") else args.test_split)
    try:
        upstream = load_upstream(args.upstream, random_init=args.random_init, seed=args.seed, device=args.device)
        print(f"probe: {args.task} on {upstream.name} ({upstream.num_states} hidden states of {upstream.dim} dims), "
              f"{args.manifest_dir}", flush=True)
        result = run_probe(upstream, args.manifest_dir, cfg, log=lambda line: print(line, flush=True))
    except (ManifestError, VocabError, CheckpointError) as exc:
        print(f"speechssl probe: {exc}", file=sys.stderr)
        return 1
    hypotheses = result.pop("test_hypotheses", None)
    if out_file is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_file, json.dumps(result, indent=1) + "\n")
        if hypotheses is not None:
            atomic_write_text(args.out / f"{cfg.test_split}.hyp", "".join(h + "\n" for h in hypotheses))
    weights = " ".join(f"{w:.2f}" for w in result["layer_weights"])
    if args.task == "asr":
        line = f"valid WER {result['valid_wer']:.1f} CER {result['valid_cer']:.1f}"
        if "test_cer" in result:
            line += f"; {cfg.test_split} WER {result['test_wer']:.1f} CER {result['test_cer']:.1f}"
    else:
        line = f"valid accuracy {result['valid_accuracy']:.1f}%"
        if "test_accuracy" in result:
            line += f"; {cfg.test_split} accuracy {result['test_accuracy']:.1f}%"
    print(f"layer weights: {weights}")
    print(f"probe {args.task} ({upstream.name}, best at update {result['update']}, {result['seconds']:.0f} s): {line}")
    return 0
