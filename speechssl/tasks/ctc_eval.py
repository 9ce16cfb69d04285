"""CTC evaluation (``speechssl evaluate`` of an ``audio_finetuning`` checkpoint): decoding and WER/CER.

Reads ``<split>.tsv`` and its transcripts ``<split>.wrd`` (and ``<split>.spk`` for per-speaker scores when
present), decodes every utterance whole (greedy, prefix beam search, or torchaudio's flashlight beam
search with an optional lexicon + KenLM), and scores with jiwer. The command (arguments, dispatch on the
checkpoint's task) is :mod:`speechssl.evaluate`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional


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
        # group norm over time (BASE's first conv layer) or data2vec's positional stack sees the padding: decode
        # one utterance at a time
        from speechssl.models.pretrained import padding_changes_outputs

        batch_size, max_tokens = (1, None) if padding_changes_outputs(cfg.model) else (None, 1_600_000)
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
