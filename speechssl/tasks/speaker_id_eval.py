"""``speechssl evaluate`` for speaker-ID checkpoints: accuracy, top-5, per speaker, confusion matrix, EER.

:func:`evaluate_speaker_id` runs a checkpoint of ``speechssl finetune`` (task ``speaker_id``) over whole
utterances of ``MANIFEST_DIR/<split>.tsv`` (labels ``<split>.spk``; every speaker must be one the model
was trained on: closed set) and writes to ``out_dir``:

* ``report.json``: ``accuracy`` and ``top5_accuracy`` (percent), ``num_utterances``, ``num_speakers``,
  ``per_speaker`` (``{speaker: {"accuracy": percent, "count": n}}``), and with verification scoring
  ``eer`` (percent), ``eer_threshold``, ``num_trials``, ``eer_split``;
* ``predictions.tsv``: ``path<TAB>speaker<TAB>predicted<TAB>probability`` per utterance;
* ``confusion_matrix.png``: rows = true speaker, columns = predicted, each row normalised.

Verification scoring (``--eer-trials N``): ``N`` trial pairs (half same-speaker, half different-speaker,
drawn with a seeded RNG, with replacement) from the utterances of ``--eer-split`` (default: the evaluated
split; any speakers, so unseen speakers give an open-set verification test), scored by the cosine
similarity of the utterance embeddings (the pooled features the classifier sees); the EER is where
false acceptance and false rejection rates are equal (linear interpolation on the ROC).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from speechssl.config import ConfigError
from speechssl.data.batching import batch_by_size, ordered_indices
from speechssl.data.dataset import AudioDataset, ManifestError, collate
from speechssl.train.metrics import Progress
from speechssl.utils.io import atomic_open, atomic_write_text

OUTPUT_FILES = ("report.json", "predictions.tsv", "confusion_matrix.png")


# --------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------


def topk_accuracy(logits: np.ndarray, targets: np.ndarray, k: int) -> float:
    """Fraction of rows of ``logits (N, S)`` whose target is among the ``k`` highest scores."""
    k = min(k, logits.shape[1])
    top = np.argpartition(-logits, k - 1, axis=1)[:, :k]
    return float((top == targets[:, None]).any(axis=1).mean()) if len(targets) else 0.0


def confusion_matrix(targets: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """``(S, S)`` counts: ``cm[true, predicted]``."""
    flat = np.bincount(targets * num_classes + predictions, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes)


def compute_eer(scores: np.ndarray, is_target: np.ndarray) -> tuple[float, float]:
    """Equal error rate (fraction) and its threshold for trial ``scores`` (higher = same speaker).

    Thresholds run over the distinct scores (ties accepted together); the EER is the crossing of the
    false-acceptance and false-rejection rates, linearly interpolated between the two thresholds
    around it.
    """
    scores = np.asarray(scores, dtype=np.float64)
    is_target = np.asarray(is_target, dtype=bool)
    n_tar, n_non = int(is_target.sum()), int((~is_target).sum())
    if n_tar == 0 or n_non == 0:
        raise ValueError(f"EER needs target and non-target trials, got {n_tar} and {n_non}")
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], is_target[order]
    last = np.r_[np.flatnonzero(np.diff(s) != 0), len(s) - 1]  # last trial of each tie group
    accepted_tar = np.r_[0, np.cumsum(y)[last]]
    accepted_non = np.r_[0, np.cumsum(~y)[last]]
    far = accepted_non / n_non  # rises with the number of accepted trials
    frr = 1.0 - accepted_tar / n_tar  # falls
    thresholds = np.r_[np.inf, s[last]]
    k = int(np.argmax(far >= frr))  # first point at or past the crossing (exists: far[-1] = 1 >= frr[-1] = 0)
    if k == 0:
        return float(far[0]), float(thresholds[0])
    d0, d1 = frr[k - 1] - far[k - 1], frr[k] - far[k]
    alpha = d0 / (d0 - d1) if d0 != d1 else 0.0
    eer = far[k - 1] + alpha * (far[k] - far[k - 1])
    if k == 1:  # the point before is "accept nothing" (threshold +inf)
        return float(eer), float(thresholds[1])
    return float(eer), float(thresholds[k - 1] + alpha * (thresholds[k] - thresholds[k - 1]))


def draw_trials(speakers: np.ndarray, num_trials: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seeded verification trials over utterances with speaker codes ``speakers (N,)``.

    Returns ``(a, b, is_target)``: ``num_trials // 2`` same-speaker pairs (``a != b``; first utterance
    uniform over those whose speaker has another one) and the rest different-speaker pairs (first
    utterance uniform, second uniform over the other speakers' utterances). Drawn with replacement.
    """
    speakers = np.asarray(speakers)
    n = len(speakers)
    rng = np.random.default_rng(seed)
    order = np.argsort(speakers, kind="stable")
    uniq, first, counts = np.unique(speakers[order], return_index=True, return_counts=True)
    if len(uniq) < 2:
        raise ValueError(f"verification trials need at least 2 speakers, found {len(uniq)}")
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n)
    group = np.searchsorted(uniq, speakers)
    n_tar = num_trials // 2
    eligible = np.flatnonzero(counts[group] >= 2)
    if n_tar and not len(eligible):
        raise ValueError("same-speaker trials need a speaker with at least 2 utterances")
    a_tar = rng.choice(eligible, n_tar) if n_tar else np.zeros(0, dtype=np.int64)
    g, m = group[a_tar], counts[group[a_tar]]
    shift = 1 + rng.integers(0, np.maximum(m - 1, 1))
    b_tar = order[first[g] + (rank[a_tar] - first[g] + shift) % m]
    n_non = num_trials - n_tar
    a_non = rng.integers(0, n, n_non)
    g, m = group[a_non], counts[group[a_non]]
    r = rng.integers(0, n - m)  # position among the other speakers' utterances (sorted order)
    b_non = order[np.where(r >= first[g], r + m, r)]
    is_target = np.r_[np.ones(n_tar, dtype=bool), np.zeros(n_non, dtype=bool)]
    return np.r_[a_tar, a_non], np.r_[b_tar, b_non], is_target


def cosine_scores(embeddings: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of ``embeddings[a]`` and ``embeddings[b]`` row by row."""
    e = embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
    return np.einsum("nd,nd->n", e[a], e[b])


# --------------------------------------------------------------------------------------------------
# Running the model
# --------------------------------------------------------------------------------------------------


def _device(name: Optional[str]) -> torch.device:
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def check_trial_labels(labels: list[str], spk_path: Path, num_trials: int) -> None:
    """ManifestError unless the speakers ``labels`` can give ``num_trials`` verification trials (both kinds)."""
    counts: dict[str, int] = {}
    for s in labels:
        counts[s] = counts.get(s, 0) + 1
    if len(counts) < 2:
        raise ManifestError(f"{spk_path}: verification trials (--eer-trials) need at least 2 speakers, the split has "
                            f"{len(counts)} ({', '.join(sorted(counts)) or 'none'}); choose another --eer-split")
    if num_trials >= 2 and max(counts.values()) < 2:
        raise ManifestError(f"{spk_path}: same-speaker trials need a speaker with at least 2 utterances; every "
                            "speaker of the split has one; choose another --eer-split")


def eval_dataset(manifest_dir: Path, split: str, sample_rate: int, normalize: bool) -> AudioDataset:
    """Whole utterances of ``<split>.tsv`` with ``<split>.spk``."""
    tsv, spk = manifest_dir / f"{split}.tsv", manifest_dir / f"{split}.spk"
    if not tsv.is_file():
        raise ManifestError(f"{tsv}: manifest not found (choose the split with --split)")
    if not spk.is_file():
        raise ManifestError(f"{spk}: speaker labels not found; 'speechssl manifest' writes <split>.spk when every "
                            "file has a speaker (LibriSpeech layout or --speaker-regex)")
    return AudioDataset(tsv, sample_rate=sample_rate, normalize=normalize, pad=True, random_crop=False,
                        label_files=[spk])


def _one_thread(_: int) -> None:
    torch.set_num_threads(1)


@torch.no_grad()
def run_model(model: torch.nn.Module, data: AudioDataset, device: torch.device, batch_size: Optional[int],
              max_tokens: Optional[int]) -> tuple[np.ndarray, np.ndarray]:
    """``(logits (N, S), embeddings (N, E))`` for every item of ``data``, in item order.

    Batches of similar lengths (longest first) of at most ``batch_size`` utterances and ``max_tokens``
    samples including padding (raised to the longest utterance: none is cut or dropped).
    """
    sizes = data.sizes
    if max_tokens is not None:
        max_tokens = max(max_tokens, int(sizes.max()))
    batches = batch_by_size(ordered_indices(sizes, None), sizes, max_tokens,
                            batch_size if batch_size or max_tokens else 16)
    loader = torch.utils.data.DataLoader(data, batch_sampler=[b.tolist() for b in batches], collate_fn=collate,
                                         num_workers=1, worker_init_fn=_one_thread)
    logits, embeddings = [None] * len(data), [None] * len(data)
    for batch in Progress(loader, len(loader), f"scoring {len(data)} utterances", unit="batch"):
        pad = batch["padding_mask"]
        out = model(batch["source"].to(device), None if pad is None else pad.to(device))
        for row, i in enumerate(batch["id"].tolist()):
            logits[i] = out["logits"][row].float().cpu()
            embeddings[i] = out["embedding"][row].float().cpu()
    return torch.stack(logits).numpy(), torch.stack(embeddings).numpy()


def plot_confusion(cm: np.ndarray, names: list[str], path: Path, title: str) -> None:
    """Row-normalised confusion matrix as a PNG (speaker names on the axes up to 50 speakers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = cm.sum(axis=1, keepdims=True)
    norm = cm / np.maximum(rows, 1)
    size = min(4 + 0.25 * len(names), 20)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    im = ax.imshow(norm, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, label="share of the true speaker's utterances")
    ax.set_xlabel("predicted speaker")
    ax.set_ylabel("true speaker")
    ax.set_title(title)
    if len(names) <= 50:
        ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
        ax.set_yticks(range(len(names)), names, fontsize=7)
    fig.tight_layout()
    with atomic_open(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------
# Entry point (called by speechssl/evaluate.py, the command)
# --------------------------------------------------------------------------------------------------


def evaluate_speaker_id(ckpt_path: str | Path, manifest_dir: str | Path, split: str, out_dir: str | Path, *,
                        device: Optional[str] = None, batch_size: Optional[int] = None,
                        extra: Any = None) -> dict[str, Any]:
    """Score a speaker-ID checkpoint on ``manifest_dir/<split>``; write and return the report.

    ``out_dir`` None writes no files. ``extra`` (the evaluate command's namespace) may carry
    ``max_tokens`` (samples per batch, padding included), ``eer_trials`` (0: no verification scoring),
    ``eer_split``, ``eer_seed`` and ``force`` (replace existing output files).

    Upstreams with the group-norm feature extractor (wav2vec 2.0 / HuBERT BASE, ``extractor_mode:
    default``) normalise each conv channel over the whole input, padding included, and data2vec's stacked
    positional convolutions see the padded frames, so padded batches shift their features
    (:func:`~speechssl.models.pretrained.padding_changes_outputs`); without ``batch_size`` and ``max_tokens``
    those are scored one utterance at a time (exact), others in batches of 1.6M samples.
    """
    from speechssl.tasks.speaker_id import load_speaker_checkpoint

    max_tokens = getattr(extra, "max_tokens", None)
    eer_trials = int(getattr(extra, "eer_trials", 0) or 0)
    eer_split = getattr(extra, "eer_split", None) or split
    eer_seed = int(getattr(extra, "eer_seed", 0) or 0)
    manifest_dir, out_dir = Path(manifest_dir), None if out_dir is None else Path(out_dir)
    existing = [] if out_dir is None else [out_dir / f for f in OUTPUT_FILES if (out_dir / f).exists()]
    if existing and not getattr(extra, "force", False):
        raise ConfigError(f"{out_dir} already holds {', '.join(p.name for p in existing)}; add --force to replace "
                          "them or choose another --out")
    dev = _device(device)
    t0 = time.perf_counter()
    model, cfg = load_speaker_checkpoint(ckpt_path, dev)
    if batch_size is None and max_tokens is None:  # outputs that see the padding: one at a time
        from speechssl.models.pretrained import padding_changes_outputs

        batch_size, max_tokens = (1, None) if padding_changes_outputs(cfg.model) else (None, 1_600_000)
    speakers = model.speakers
    index = {s: i for i, s in enumerate(speakers)}
    data = eval_dataset(manifest_dir, split, cfg.task.sample_rate, cfg.task.normalize)
    labels = data.labels[0]
    unknown = sorted(set(labels) - index.keys())
    if unknown:
        raise ManifestError(
            f"{manifest_dir / (split + '.spk')}: {len(unknown)} speaker(s) the model was not trained on "
            f"({', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}); identification accuracy is closed-set: "
            "evaluate a split of the training speakers, and score unseen speakers with --eer-trials N --eer-split "
            f"{split}")
    eer_data = data
    if eer_trials > 0:  # checked before any scoring: a split that cannot give trials is an error now
        if eer_split != split:
            eer_data = eval_dataset(manifest_dir, eer_split, cfg.task.sample_rate, cfg.task.normalize)
        check_trial_labels(eer_data.labels[0], manifest_dir / f"{eer_split}.spk", eer_trials)
    targets = np.fromiter((index[s] for s in labels), dtype=np.int64, count=len(labels))
    logits, embeddings = run_model(model, data, dev, batch_size, max_tokens)
    pred = logits.argmax(axis=1)
    correct = pred == targets
    cm = confusion_matrix(targets, pred, len(speakers))
    present = np.flatnonzero(cm.sum(axis=1))
    per_speaker = {speakers[i]: {"accuracy": round(100.0 * cm[i, i] / cm[i].sum(), 2), "count": int(cm[i].sum())}
                   for i in sorted(present, key=lambda i: speakers[i])}
    report: dict[str, Any] = {
        "checkpoint": str(ckpt_path), "manifest": str(manifest_dir / f"{split}.tsv"), "split": split,
        "accuracy": round(100.0 * float(correct.mean()), 2),
        "top5_accuracy": round(100.0 * topk_accuracy(logits, targets, 5), 2),
        "num_utterances": int(len(targets)), "num_correct": int(correct.sum()),
        "num_speakers": int(len(present)), "num_model_speakers": len(speakers),
        "per_speaker": per_speaker,
    }
    if eer_trials > 0:
        if eer_split == split:
            eer_embeddings, eer_labels = embeddings, labels
        else:
            _, eer_embeddings = run_model(model, eer_data, dev, batch_size, max_tokens)
            eer_labels = eer_data.labels[0]
        codes = np.unique(np.asarray(eer_labels), return_inverse=True)[1]
        a, b, is_target = draw_trials(codes, eer_trials, eer_seed)
        eer, threshold = compute_eer(cosine_scores(eer_embeddings, a, b), is_target)
        report.update(eer=round(100.0 * eer, 2), eer_threshold=round(threshold, 4), num_trials=int(eer_trials),
                      eer_split=eer_split, eer_seed=eer_seed)
    report.update(batch_size=batch_size, max_tokens=max_tokens, device=str(dev),
                  seconds=round(time.perf_counter() - t0, 2))
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        probs = torch.from_numpy(logits).softmax(dim=1).numpy()
        rows = [f"{data.manifest.files[data.line_index[i]]}\t{labels[i]}\t{speakers[pred[i]]}\t{probs[i, pred[i]]:.4f}"
                for i in range(len(labels))]
        atomic_write_text(out_dir / "predictions.tsv",
                          "path\tspeaker\tpredicted\tprobability\n" + "\n".join(rows) + "\n")
        by_name = np.argsort(np.asarray(speakers, dtype=object), kind="stable")
        plot_confusion(cm[np.ix_(by_name, by_name)], [speakers[i] for i in by_name], out_dir / "confusion_matrix.png",
                       f"{split}: accuracy {report['accuracy']:.2f}% ({len(targets)} utterances)")
        atomic_write_text(out_dir / "report.json", json.dumps(report, indent=2) + "\n")

    worst = sorted(per_speaker.items(), key=lambda kv: (kv[1]["accuracy"], kv[0]))[:5]
    print(f"checkpoint: {ckpt_path}")
    print(f"split:      {manifest_dir / split}.tsv: {len(targets)} utterances, {len(present)} speakers "
          f"(model: {len(speakers)} speakers, chance {100.0 / len(speakers):.2f}%)")
    print(f"top-5 accuracy: {report['top5_accuracy']:.2f}%")
    print("lowest per-speaker accuracy: " + ", ".join(f"{s} {v['accuracy']:.0f}% ({v['count']})" for s, v in worst))
    if eer_trials > 0:
        print(f"verification EER: {report['eer']:.2f}% ({eer_trials} cosine trials on {eer_split}, seed {eer_seed})")
    if out_dir is not None:
        print(f"wrote {out_dir / 'report.json'}, predictions.tsv, confusion_matrix.png")
    else:
        print("(add --out DIR for report.json, predictions.tsv and the confusion-matrix PNG)")
    print(f"accuracy: {report['accuracy']:.2f}% ({report['num_correct']}/{len(targets)} utterances of {split})")
    return report
