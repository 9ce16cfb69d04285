"""``speechssl evaluate CKPT MANIFEST_DIR``: score a fine-tuned checkpoint on one split of a manifest.

Dispatches on the checkpoint's ``task.name``: CTC (``audio_finetuning``) -> decoding and WER/CER here;
``speaker_id`` -> :func:`speechssl.tasks.speaker_id_eval.evaluate_speaker_id`.

CTC: reads ``<split>.tsv`` and its transcripts ``<split>.wrd`` (and ``<split>.spk`` for per-speaker
scores when present), decodes every utterance whole (greedy, prefix beam search, or torchaudio's
flashlight beam search with an optional lexicon + KenLM), and scores with jiwer.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

from speechssl.utils.args import NON_NEGATIVE, POSITIVE

DESCRIPTION = """\
Evaluate a fine-tuned checkpoint on a manifest split. For CTC checkpoints: decode every utterance of
MANIFEST_DIR/<split>.tsv and score against <split>.wrd (WER/CER in percent, jiwer). Works on any manifest
with .wrd transcripts, including audio never seen in training (other folders; other sample rates after
'speechssl manifest --resample-to'). For speaker-ID checkpoints: accuracy (and EER) on <split>.spk.

--out DIR gets report.json (wer, cer, num_utterances, per-speaker scores, settings), utterances.tsv
(path, speaker, reference, hypothesis, errors per utterance), hyp.wrd / ref.wrd aligned with the TSV,
and per_speaker.tsv. The last printed line states the WER.

Decoders (--decoder): greedy (default; batched best path), beam (prefix beam search, no extra
package), flashlight (torchaudio's beam search; optional --lexicon and --lm KenLM model; needs
pip install 'speechssl[decode]').

Examples:
  speechssl evaluate runs/ctc_tiny/checkpoint_best.pt manifests/demo/labeled_10min --split test --out runs/ctc_tiny/eval_test
  speechssl evaluate runs/ft10h/checkpoint_best.pt manifests/librispeech --split test_other \\
      --decoder flashlight --lexicon librispeech_lexicon.lst --lm 4-gram.arpa --lm-weight 2 --word-score -1
  # speaker ID: accuracy, top-5, per speaker, confusion matrix; cosine EER over 4000 trial pairs
  speechssl evaluate runs/sid_frozen/checkpoint_best.pt manifests/demo/speaker_id --split test \
      --out runs/sid_frozen/eval_test --eer-trials 4000
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="checkpoint of 'speechssl finetune' (e.g. runs/x/checkpoint_best.pt)")
    p.add_argument("manifest_dir", help="manifest folder holding <split>.tsv and its labels")
    p.add_argument("--split", default="valid", help="split name: reads <split>.tsv and <split>.wrd")
    p.add_argument("--out", help="write report.json, utterances.tsv, hyp/ref files, per_speaker.tsv here")
    p.add_argument("--force", action="store_true", help="overwrite existing files in --out")
    p.add_argument("--batch-size", type=POSITIVE, default=None,
                   help="utterances per batch (default: 1 for group-norm extractors, which normalise over the "
                   "padding too, so that scores do not depend on batching; else batches of --max-tokens)")
    p.add_argument("--max-tokens", type=POSITIVE, default=None,
                   help="audio samples per batch, padding included (default 1,600,000 where batching is exact)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    g = p.add_argument_group("CTC decoding")
    g.add_argument("--decoder", choices=["greedy", "beam", "flashlight"], default="greedy")
    g.add_argument("--beam-size", type=POSITIVE, default=20, help="beam / flashlight: hypotheses kept per frame")
    g.add_argument("--lexicon", help="flashlight: lexicon file (WORD spelling per line) constraining the words")
    g.add_argument("--lm", help="flashlight: KenLM language model (ARPA or binary)")
    g.add_argument("--lm-weight", type=float, default=2.0, help="flashlight: language model weight")
    g.add_argument("--word-score", type=float, default=0.0, help="flashlight: score added per word")
    g = p.add_argument_group("speaker ID")
    g.add_argument("--eer-trials", type=NON_NEGATIVE, default=0,
                   help="verification: score this many trial pairs (half same-speaker) by cosine similarity of the "
                        "utterance embeddings and report the EER (0: off)")
    g.add_argument("--eer-split", help="split the trials are drawn from (default: --split; any speakers)")
    g.add_argument("--eer-seed", type=NON_NEGATIVE, default=0, help="seed of the trial draw")


class EvaluationError(ValueError):
    """Bad checkpoint / manifest for evaluation; the message says what to do."""


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def read_lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def decode_split(model, vocab, dataset, device, decoder: str = "greedy", beam_size: int = 20,
                 max_tokens: Optional[int] = 1_600_000, batch_size: Optional[int] = None,
                 flashlight=None, progress: bool = True) -> list[str]:
    """Hypothesis text of every item of ``dataset`` (an AudioDataset with ``pad``), in dataset order;
    ``progress``: a bar (terminal) or a line every 30 s with the utterances done and the ETA."""
    import torch

    from speechssl.data.batching import batch_by_size, ordered_indices
    from speechssl.data.dataset import collate
    from speechssl.decode.beam import beam_decode
    from speechssl.decode.greedy import greedy_decode
    from speechssl.train.metrics import Progress

    sizes = dataset.sizes
    if max_tokens is not None and int(sizes.max()) > max_tokens:
        max_tokens = int(sizes.max())  # one long utterance alone: never drop an utterance from scoring
    batches = batch_by_size(ordered_indices(sizes, None), sizes, max_tokens, batch_size)
    keys = [[(int(i), int(sizes[b].max()), 0) for i in b] for b in batches]
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=keys, collate_fn=collate, num_workers=0)
    hyps: list[Optional[str]] = [None] * len(dataset)
    model.eval()
    with torch.inference_mode():
        for batch in Progress(loader, len(loader), f"decoding {len(dataset)} utterances", unit="batch",
                              enabled=progress):
            pad = batch["padding_mask"]
            net = model(batch["source"].to(device), None if pad is None else pad.to(device))
            logits, lengths = net["logits"].float(), net["lengths"]
            if decoder == "greedy":
                ids = greedy_decode(logits, lengths)
                texts = [vocab.decode(x) for x in ids]
            elif decoder == "beam":
                texts = [vocab.decode(x) for x in beam_decode(logits.cpu(), lengths.cpu(), beam_size)]
            else:
                texts = flashlight(logits.cpu(), lengths.cpu())
            for i, text in zip(batch["id"].tolist(), texts):
                hyps[i] = text
    assert all(h is not None for h in hyps)
    return hyps  # type: ignore[return-value]


def evaluate_ctc(ckpt_path: str | Path, manifest_dir: str | Path, split: str = "valid",
                 out_dir: Optional[str | Path] = None, *, device: str = "auto", batch_size: Optional[int] = None,
                 max_tokens: Optional[int] = None, decoder: str = "greedy", beam_size: int = 20,
                 lexicon: Optional[str] = None, lm: Optional[str] = None, lm_weight: float = 2.0,
                 word_score: float = 0.0, force: bool = False, quiet: bool = False) -> dict[str, Any]:
    """Decode and score ``manifest_dir/<split>.tsv`` against ``<split>.wrd``; return the report dict
    (``wer``, ``cer`` in percent, ``num_utterances``, ``per_speaker``, ...) and write ``out_dir``."""
    from speechssl.data.dataset import AudioDataset
    from speechssl.decode.metrics import ErrorCounts, utterance_errors
    from speechssl.models.ctc import load_ctc_checkpoint
    from speechssl.text.vocab import Vocabulary

    manifest_dir = Path(manifest_dir)
    tsv, wrd, spk = (manifest_dir / f"{split}.{ext}" for ext in ("tsv", "wrd", "spk"))
    if not tsv.is_file():
        have = ", ".join(sorted(p.stem for p in manifest_dir.glob("*.tsv"))) or "none"
        raise EvaluationError(f"{tsv}: manifest not found (splits in {manifest_dir}: {have}); choose one with --split")
    if not wrd.is_file():
        raise EvaluationError(
            f"{wrd}: no transcripts for split '{split}'; WER needs a <split>.wrd file aligned with {tsv.name} "
            "(speechssl manifest writes it when every audio file has a transcript: a .txt/.lab sidecar or a "
            "*.trans.txt; see manifests/README.md)")
    out = Path(out_dir) if out_dir else None
    files = ["report.json", "utterances.tsv", "hyp.wrd", "ref.wrd", "per_speaker.tsv"]
    if out is not None and not force:
        existing = [f for f in files if (out / f).exists()]
        if existing:
            raise EvaluationError(f"{out} already holds {', '.join(existing)}; add --force to overwrite")
    dev = _device(device)
    model, cfg = load_ctc_checkpoint(str(ckpt_path), dev)
    vocab = Vocabulary.for_task(cfg.task)
    if batch_size is None and max_tokens is None:
        # group norm over time (BASE's first conv layer) sees the padding: decode one utterance at a time
        batch_size, max_tokens = (1, None) if cfg.model.extractor_mode == "default" else (None, 1_600_000)
    flashlight = None
    if decoder == "flashlight":
        from speechssl.decode.flashlight import FlashlightDecoder

        flashlight = FlashlightDecoder(vocab, lexicon, lm, beam_size, lm_weight, word_score)
    elif lexicon or lm:
        raise EvaluationError("--lexicon / --lm need --decoder flashlight")
    dataset = AudioDataset(tsv, sample_rate=cfg.task.sample_rate, normalize=cfg.task.normalize, pad=True,
                           label_files=[wrd])
    speakers = read_lines(spk) if spk.is_file() else None
    if speakers is not None and len(speakers) != len(dataset):
        speakers = None
    refs = [" ".join(line.split()) for line in dataset.labels[0]]
    t0 = time.perf_counter()
    hyps = decode_split(model, vocab, dataset, dev, decoder, beam_size, max_tokens, batch_size, flashlight,
                        progress=not quiet)
    seconds = time.perf_counter() - t0
    words, chars = utterance_errors(refs, hyps)
    total_w, total_c = ErrorCounts(), ErrorCounts()
    per_spk: dict[str, list[ErrorCounts]] = {}
    for i, (w, c) in enumerate(zip(words, chars)):
        total_w += w
        total_c += c
        if speakers is not None:
            acc = per_spk.setdefault(speakers[i], [ErrorCounts(), ErrorCounts(), 0])
            acc[0] += w
            acc[1] += c
            acc[2] += 1
    audio_seconds = float(dataset.sizes.sum()) / cfg.task.sample_rate
    report = {
        "wer": round(total_w.rate, 4), "cer": round(total_c.rate, 4), "num_utterances": len(dataset),
        "word_errors": total_w.errors, "words": total_w.total, "char_errors": total_c.errors, "chars": total_c.total,
        "per_speaker": {s: {"wer": round(a[0].rate, 4), "cer": round(a[1].rate, 4), "num_utterances": a[2]}
                        for s, a in sorted(per_spk.items())},
        "checkpoint": str(ckpt_path), "manifest": str(tsv), "split": split, "decoder": decoder,
        "beam_size": beam_size if decoder != "greedy" else None, "lexicon": lexicon, "lm": lm,
        "batch_size": batch_size, "max_tokens": max_tokens, "audio_seconds": round(audio_seconds, 2), "decode_seconds": round(seconds, 2),
        "real_time_factor": round(seconds / max(audio_seconds, 1e-9), 5), "device": str(dev),
    }
    if out is not None:
        _write_outputs(out, dataset, refs, hyps, words, chars, speakers, report)
    if not quiet:
        _print_summary(report, out)
    return report


def _write_outputs(out: Path, dataset, refs, hyps, words, chars, speakers, report) -> None:
    from speechssl.utils.io import atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    rows = ["path\tspeaker\tword_errors\twords\tchar_errors\tchars\treference\thypothesis"]
    for i in range(len(dataset)):
        path = dataset.manifest.files[dataset.line_index[i]]
        spk = speakers[i] if speakers is not None else ""
        rows.append(f"{path}\t{spk}\t{words[i].errors}\t{words[i].total}\t{chars[i].errors}\t{chars[i].total}\t"
                    f"{refs[i]}\t{hyps[i]}")
    atomic_write_text(out / "utterances.tsv", "\n".join(rows) + "\n")
    atomic_write_text(out / "hyp.wrd", "".join(h + "\n" for h in hyps))
    atomic_write_text(out / "ref.wrd", "".join(r + "\n" for r in refs))
    spk_rows = ["speaker\tnum_utterances\twer\tcer"] + [
        f"{s}\t{v['num_utterances']}\t{v['wer']:.2f}\t{v['cer']:.2f}" for s, v in report["per_speaker"].items()]
    atomic_write_text(out / "per_speaker.tsv", "\n".join(spk_rows) + "\n")
    atomic_write_text(out / "report.json", json.dumps(report, indent=2) + "\n")


def _print_summary(report: dict[str, Any], out: Optional[Path]) -> None:
    print(f"checkpoint: {report['checkpoint']}")
    print(f"split: {report['manifest']} ({report['num_utterances']} utterances, {report['audio_seconds']:.1f} s of "
          f"audio), decoder {report['decoder']}, {report['decode_seconds']:.1f} s (RTF {report['real_time_factor']:.4f})")
    for spk, v in report["per_speaker"].items():
        print(f"  speaker {spk}: WER {v['wer']:.2f}%  CER {v['cer']:.2f}%  ({v['num_utterances']} utterances)")
    if out is not None:
        print(f"wrote {out}/report.json, utterances.tsv, hyp.wrd, ref.wrd, per_speaker.tsv")
    print(f"CER {report['cer']:.2f}% ({report['char_errors']}/{report['chars']} characters)")
    print(f"WER {report['wer']:.2f}% ({report['word_errors']}/{report['words']} words, "
          f"{report['num_utterances']} utterances)")


def checkpoint_task(path: str | Path) -> str:
    """``task.name`` stored in a checkpoint (error naming the file when it has none)."""
    from speechssl.train.checkpoint import load_checkpoint

    path = Path(path)
    state = load_checkpoint(path)  # CheckpointError: missing, a folder, damaged, another toolkit's file
    task = state["config"].get("task")
    name = task.get("name") if isinstance(task, dict) else None
    if not name:
        raise EvaluationError(f"{path}: its stored config has no task.name (not written by 'speechssl finetune')")
    return str(name)


def run(args: argparse.Namespace) -> int:
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from speechssl.data.dataset import ManifestError
    from speechssl.text.vocab import VocabError
    from speechssl.utils.io import file_in_the_way

    try:
        blocker = file_in_the_way(args.out) if args.out else None
        if blocker is not None:  # found now, not after the scoring
            raise EvaluationError(f"--out {args.out}: {blocker} is a file, not a folder; choose another --out")
        task = checkpoint_task(args.checkpoint)
        if task == "speaker_id":
            from speechssl.tasks.speaker_id_eval import evaluate_speaker_id

            evaluate_speaker_id(args.checkpoint, args.manifest_dir, args.split, args.out, device=args.device,
                                batch_size=args.batch_size, extra=args)
            return 0
        if task != "audio_finetuning":
            raise EvaluationError(f"{args.checkpoint}: task.name={task} is not a fine-tuned task (audio_finetuning "
                                  "or speaker_id); pretrained checkpoints are fine-tuned first ('speechssl finetune')")
        evaluate_ctc(args.checkpoint, args.manifest_dir, args.split, args.out, device=args.device,
                     batch_size=args.batch_size, max_tokens=args.max_tokens, decoder=args.decoder,
                     beam_size=args.beam_size, lexicon=args.lexicon, lm=args.lm, lm_weight=args.lm_weight,
                     word_score=args.word_score, force=args.force)
    except (EvaluationError, ManifestError, VocabError, ImportError, RuntimeError) as exc:
        print(f"speechssl evaluate: {exc}", file=sys.stderr)
        return 1
    return 0
