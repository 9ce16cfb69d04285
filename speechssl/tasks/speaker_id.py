"""Speaker identification fine-tuning (SUPERB's SID task; ``task.name: speaker_id``).

:func:`build_speaker_id` turns a recipe into a :class:`~speechssl.train.loop.TrainingSetup`:

* labels: ``<split>.spk`` (one speaker per manifest line; ``task.labels: [spk]``, the default) mapped to
  class indices by the line order of ``dict.spk.txt`` (the train speakers, as ``speechssl manifest``
  writes it). Closed set: every valid speaker must be a train speaker (``speechssl manifest
  --split-by utterance`` holds out a share of each speaker's utterances); the error names the file;
* model: :class:`~speechssl.models.speaker.SpeakerIdModel` on the upstream of ``model.w2v_path`` (its
  architecture with the recipe's fine-tuning settings, as CTC fine-tuning), or on the recipe's own
  architecture randomly initialised when ``w2v_path`` is unset (``model.no_pretrained_weights: true``
  keeps the checkpoint's architecture but not its weights: the baseline of the same shape).
  ``cfg.model`` is replaced by the resolved architecture, so checkpoints are self-contained;
* training: random crops of ``task.max_sample_size`` samples (every crop in a batch the same length);
  validation: whole utterances, padded (cut at ``dataset.max_tokens`` samples when longer);
* objective: cross-entropy per utterance; train and valid records log ``accuracy`` (exact over the
  split), ``correct`` and ``count``: use ``checkpoint.best_checkpoint_metric: accuracy`` with
  ``maximize_best_checkpoint_metric: true``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from speechssl.config import Config, ConfigError, ModelConfig
from speechssl.data.dataset import AudioDataset, ManifestError, collate, dataset_for_split
from speechssl.models.speaker import SpeakerIdModel, speaker_cross_entropy
from speechssl.objectives.output import LossOutput

SPEAKER_DICT = "dict.spk.txt"
# ModelConfig fields a speaker-ID recipe sets on top of a pretrained upstream's architecture: CTC
# fine-tuning's (dropout, masking, LayerDrop, w2v_path, freezing) and the speaker head's.
SPEAKER_FIELDS = ("no_pretrained_weights", "freeze_upstream", "projector_dim", "pooling")


def label_ext(cfg: Config) -> str:
    labels = list(cfg.task.labels) or ["spk"]
    if len(labels) != 1:
        raise ConfigError(f"task.labels={labels}: speaker ID reads one label file per split, e.g. [spk]")
    return labels[0]


def read_speaker_dict(path: str | Path) -> list[str]:
    """Speakers in ``dict.spk.txt`` order (lines ``speaker count``); index = class."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: speaker dictionary not found; 'speechssl manifest' writes it (with train.spk) "
                            "when every training file has a speaker (LibriSpeech layout or --speaker-regex)")
    speakers = []
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        name, sep, count = line.rpartition(" ")
        if not sep or not name or not count.isdigit():
            raise ManifestError(f"{path}:{lineno}: expected 'speaker count', got {line!r}")
        speakers.append(name)
    if len(set(speakers)) != len(speakers):
        raise ManifestError(f"{path}: a speaker is listed twice")
    if len(speakers) < 2:
        raise ManifestError(f"{path}: speaker identification needs at least 2 speakers, found {len(speakers)}")
    return speakers


def speaker_targets(data: AudioDataset, index: dict[str, int], dict_path: Path) -> np.ndarray:
    """Class index of every item of ``data`` (its first label file); unknown speakers are an error."""
    labels = data.labels[0]
    unknown = sorted(set(labels) - index.keys())
    if unknown:
        shown = ", ".join(unknown[:5]) + (" ..." if len(unknown) > 5 else "")
        raise ManifestError(
            f"{data.manifest.path.with_suffix('')}.* lists {len(unknown)} speaker(s) not in {dict_path} ({shown}): "
            "speaker identification is closed-set; hold out a share of each train speaker's utterances instead "
            "('speechssl manifest AUDIO_DIR --out DIR --split-by utterance --valid-percent 0.2')")
    return np.fromiter((index[s] for s in labels), dtype=np.int64, count=len(labels))


class SpeakerCollater:
    """:func:`~speechssl.data.dataset.collate` plus ``target`` (LongTensor ``(B,)``, class indices)."""

    def __init__(self, speakers: Sequence[str]):
        self.index = {s: i for i, s in enumerate(speakers)}

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        batch = collate(items)
        batch["target"] = torch.tensor([self.index[it["labels"][0]] for it in items], dtype=torch.long)
        return batch


class SpeakerIdCriterion:
    """``objective(model, batch) -> LossOutput``: summed cross-entropy over the utterances (sample size
    = utterances), logs ``accuracy``, ``correct``, ``count``."""

    def __call__(self, model: torch.nn.Module, batch: dict[str, Any]) -> LossOutput:
        out = model(batch["source"], batch["padding_mask"])
        loss, logs = speaker_cross_entropy(out["logits"], batch["target"])
        return LossOutput(loss=loss, sample_size=logs["count"], logs=logs)


# --------------------------------------------------------------------------------------------------
# Closed-set manifests
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Utterance:
    path: str
    samples: int
    speaker: str

    @property
    def sort_key(self) -> str:
        return self.path

    @property
    def seconds(self) -> float:
        return self.samples / 16000.0


def make_closed_set_manifest(src_dir: str | Path, out_dir: str | Path, valid_fraction: float = 0.15,
                             test_fraction: float = 0.15, seed: int = 42, split: str = "train",
                             force: bool = False) -> dict[str, int]:
    """Split ``src_dir/<split>.tsv`` (+ ``.spk``) into a closed-set speaker-ID manifest in ``out_dir``:
    ``train``, ``valid`` and ``test`` (``.tsv`` + ``.spk``) with the same speakers, about
    ``valid_fraction`` / ``test_fraction`` of each speaker's utterances held out
    (:func:`~speechssl.data.manifest_split.carve_closed_set`), and ``dict.spk.txt`` of the new train.

    Only speaker labels are carried over. Existing files are replaced only with ``force``. Returns the
    number of utterances per split.
    """
    from speechssl.data.dataset import read_manifest
    from speechssl.data.manifest_labels import count_dictionary
    from speechssl.data.manifest_split import carve_closed_set
    from speechssl.utils.io import atomic_write_text

    src_dir, out_dir = Path(src_dir), Path(out_dir)
    manifest = read_manifest(src_dir / f"{split}.tsv")
    spk_path = src_dir / f"{split}.spk"
    if not spk_path.is_file():
        raise ManifestError(f"{spk_path}: speaker labels not found (see 'speechssl manifest --speaker-regex')")
    speakers = spk_path.read_text().splitlines()
    if len(speakers) != len(manifest.files):
        raise ManifestError(f"{spk_path}: {len(speakers)} lines but {manifest.path} has {len(manifest.files)} entries")
    names = [f"{s}.{ext}" for s in ("train", "valid", "test") for ext in ("tsv", "spk")] + [SPEAKER_DICT]
    existing = [n for n in names if (out_dir / n).exists()]
    if existing and not force:
        raise ManifestError(f"{out_dir} already holds {', '.join(existing)}; pass force=True (--force) to replace them")
    items = [_Utterance(f, int(n), s) for f, n, s in zip(manifest.files, manifest.sizes, speakers)]
    splits = dict(zip(("train", "valid", "test"), carve_closed_set(items, valid_fraction, test_fraction, seed)))
    for name, rows in splits.items():
        atomic_write_text(out_dir / f"{name}.tsv",
                          "\n".join([str(manifest.root)] + [f"{u.path}\t{u.samples}" for u in rows]) + "\n")
        atomic_write_text(out_dir / f"{name}.spk", "".join(f"{u.speaker}\n" for u in rows))
    entries = count_dictionary(u.speaker for u in splits["train"])
    atomic_write_text(out_dir / SPEAKER_DICT, "".join(f"{sym} {n}\n" for sym, n in entries))
    return {name: len(rows) for name, rows in splits.items()}

def make_cross_session_manifest(src_dir: str | Path, out_dir: str | Path, split: str = "train",
                                force: bool = False) -> dict[str, int]:
    """Split ``src_dir/<split>.tsv`` (+ ``.spk``) into a closed-set speaker-ID manifest whose splits are
    different recording sessions: per speaker, its last chapter (LibriSpeech layout
    ``speaker/chapter/file``) is ``test``, the one before ``valid``, the others ``train``. A probe then
    cannot identify speakers by their microphone (every chapter of the demo corpus is a session of its
    own). Speakers with fewer than 3 chapters are left out. Files as :func:`make_closed_set_manifest`.
    """
    from speechssl.data.dataset import read_manifest
    from speechssl.data.manifest_labels import count_dictionary
    from speechssl.utils.io import atomic_write_text

    src_dir, out_dir = Path(src_dir), Path(out_dir)
    manifest = read_manifest(src_dir / f"{split}.tsv")
    spk_path = src_dir / f"{split}.spk"
    if not spk_path.is_file():
        raise ManifestError(f"{spk_path}: speaker labels not found (see 'speechssl manifest --speaker-regex')")
    speakers = spk_path.read_text().splitlines()
    if len(speakers) != len(manifest.files):
        raise ManifestError(f"{spk_path}: {len(speakers)} lines but {manifest.path} has {len(manifest.files)} entries")
    names = [f"{s}.{ext}" for s in ("train", "valid", "test") for ext in ("tsv", "spk")] + [SPEAKER_DICT]
    existing = [n for n in names if (out_dir / n).exists()]
    if existing and not force:
        raise ManifestError(f"{out_dir} already holds {', '.join(existing)}; pass force=True (--force) to replace them")
    chapters: dict[str, dict[str, list[_Utterance]]] = {}
    for f, n, spk in zip(manifest.files, manifest.sizes, speakers):
        parts = Path(f).parts
        if len(parts) < 2:
            raise ManifestError(f"{manifest.path}: {f} is not in a speaker/chapter/file layout")
        chapters.setdefault(spk, {}).setdefault(parts[-2], []).append(_Utterance(f, int(n), spk))
    splits: dict[str, list[_Utterance]] = {"train": [], "valid": [], "test": []}
    for spk in sorted(chapters):
        ids = sorted(chapters[spk])
        if len(ids) < 3:
            continue
        for chapter in ids[:-2]:
            splits["train"] += chapters[spk][chapter]
        splits["valid"] += chapters[spk][ids[-2]]
        splits["test"] += chapters[spk][ids[-1]]
    if not splits["train"]:
        raise ManifestError(f"{manifest.path}: no speaker has 3 or more chapters (sessions) to split")
    for name, rows in splits.items():
        atomic_write_text(out_dir / f"{name}.tsv",
                          "\n".join([str(manifest.root)] + [f"{u.path}\t{u.samples}" for u in rows]) + "\n")
        atomic_write_text(out_dir / f"{name}.spk", "".join(f"{u.speaker}\n" for u in rows))
    entries = count_dictionary(u.speaker for u in splits["train"])
    atomic_write_text(out_dir / SPEAKER_DICT, "".join(f"{sym} {n}\n" for sym, n in entries))
    return {name: len(rows) for name, rows in splits.items()}


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------


def resolve_speaker_config(cfg: ModelConfig, task_normalize: Optional[bool] = None) -> ModelConfig:
    """With ``w2v_path``: the checkpoint's architecture plus the recipe's fine-tuning and head settings;
    without: ``cfg`` itself (a randomly initialised upstream of the recipe's architecture).
    ``task_normalize``: checked against the upstream's when its weights are used (as CTC fine-tuning)."""
    from speechssl.models.ctc import FINETUNE_FIELDS, resolve_finetune_config

    resolved = resolve_finetune_config(cfg, None if cfg.no_pretrained_weights else task_normalize)
    return dataclasses.replace(resolved, **{k: getattr(cfg, k) for k in FINETUNE_FIELDS + SPEAKER_FIELDS})


def build_speaker_model(cfg: ModelConfig, speakers: Sequence[str], load_upstream: bool = True) -> SpeakerIdModel:
    """A :class:`SpeakerIdModel` for a resolved ``cfg`` (see :func:`resolve_speaker_config`).

    ``load_upstream``: load the pretrained weights of ``cfg.w2v_path`` (unless ``no_pretrained_weights``);
    False when the weights come from a speaker-ID checkpoint (evaluation, resume).
    """
    from speechssl.models import build_model
    from speechssl.models.ctc import FINETUNE_FIELDS
    from speechssl.models.pretrained import load_pretrained, remove_pretraining_modules

    if load_upstream and cfg.w2v_path and not cfg.no_pretrained_weights:
        upstream, _ = load_pretrained(cfg.w2v_path, {k: getattr(cfg, k) for k in FINETUNE_FIELDS})
    else:
        upstream = build_model(cfg)
    return SpeakerIdModel(
        remove_pretraining_modules(upstream), list(speakers), freeze_upstream=cfg.freeze_upstream,
        freeze_finetune_updates=cfg.freeze_finetune_updates, apply_mask=cfg.apply_mask,
        projector_dim=cfg.projector_dim, pooling=cfg.pooling, final_dropout=cfg.final_dropout)


def load_speaker_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[SpeakerIdModel, Config]:
    """``(model in eval mode, Config)`` of a ``speechssl finetune`` speaker-ID checkpoint."""
    from speechssl.config import config_from_dict
    from speechssl.train.checkpoint import load_checkpoint

    state = load_checkpoint(path)
    if not isinstance(state, dict) or not isinstance(state.get("config"), dict) or "model" not in state:
        raise ConfigError(f"{path}: not a speechssl checkpoint (no stored config and model)")
    cfg = config_from_dict(state["config"], source=str(path))
    extra = state["model"].get("_extra_state")
    if cfg.task.name != "speaker_id" or not isinstance(extra, dict) or "speakers" not in extra:
        raise ConfigError(f"{path}: not a speaker-ID checkpoint (task.name={cfg.task.name}); make one with "
                          "'speechssl finetune recipes/speaker_id_frozen.yaml'")
    model = build_speaker_model(cfg.model, extra["speakers"], load_upstream=False)
    model.load_state_dict(state["model"])
    model.set_num_updates(int(state.get("num_updates", 0)))
    return model.to(device).eval(), cfg


# --------------------------------------------------------------------------------------------------
# Task
# --------------------------------------------------------------------------------------------------


def speaker_dataset(cfg: Config, split: str, train: bool) -> AudioDataset:
    """``task.data/<split>.tsv`` with its speaker labels: random crops for training, whole padded
    utterances (cut at ``dataset.max_tokens``) otherwise."""
    ext = label_ext(cfg)
    label_dir = Path(cfg.task.label_dir or cfg.task.data)
    if not (label_dir / f"{split}.{ext}").is_file():
        raise ManifestError(f"{label_dir / f'{split}.{ext}'}: speaker labels not found; 'speechssl manifest' writes "
                            f"<split>.spk when every file has a speaker (LibriSpeech layout or --speaker-regex)")
    if train:
        return dataset_for_split(cfg, split, [ext])
    t = cfg.task
    return AudioDataset(Path(t.data) / f"{split}.tsv", sample_rate=t.sample_rate,
                        max_sample_size=cfg.dataset.max_tokens, normalize=t.normalize, pad=True, random_crop=False,
                        seed=cfg.common.seed, label_files=[label_dir / f"{split}.{ext}"])


def build_speaker_id(cfg: Config):
    """Model, objective, datasets, collater and chance alarm of speaker-ID fine-tuning (a TrainingSetup)."""
    from speechssl.train.loop import TrainingSetup
    from speechssl.train.metrics import HealthMonitor

    if cfg.criterion.name != "speaker_id":
        raise ConfigError(f"task.name=speaker_id needs criterion.name=speaker_id, got '{cfg.criterion.name}'")
    if cfg.task.max_sample_size is None:
        raise ConfigError("speaker ID trains on random crops: set task.max_sample_size (e.g. 48000 for 3 s)")
    dict_path = Path(cfg.task.label_dir or cfg.task.data) / SPEAKER_DICT
    speakers = read_speaker_dict(dict_path)
    train = speaker_dataset(cfg, cfg.dataset.train_subset, train=True)
    valid = None if cfg.dataset.disable_validation else speaker_dataset(cfg, cfg.dataset.valid_subset, train=False)
    index = {s: i for i, s in enumerate(speakers)}
    for data in (train, valid):
        if data is not None:
            speaker_targets(data, index, dict_path)
    pretrained = bool(cfg.model.w2v_path) and not cfg.model.no_pretrained_weights
    cfg.model = resolve_speaker_config(cfg.model, cfg.task.normalize)  # saved with every checkpoint
    model = build_speaker_model(cfg.model, speakers, load_upstream=pretrained)
    m = cfg.model
    if m.freeze_upstream:
        mode = "frozen upstream (only the head trains)"
    else:
        mode = ("full fine-tuning (feature extractor frozen, Transformer trained from update "
                f"{m.freeze_finetune_updates})")
    origin = (f"pretrained {m.w2v_path}" if pretrained else
              f"random init (architecture of {m.w2v_path})" if m.w2v_path else "random init")
    summary = [
        f"speaker ID: {len(speakers)} speakers ({dict_path}), chance accuracy {1 / len(speakers):.3f}; "
        f"{m.name} {m.encoder_layers}x{m.encoder_embed_dim} upstream, {origin}; {mode}; "
        f"head: weighted sum of {m.encoder_layers + 1} hidden states, projector {m.projector_dim}, {m.pooling} "
        f"pooling; training crops of {cfg.task.max_sample_size / cfg.task.sample_rate:.1f} s",
    ]
    health = HealthMonitor(chance_accuracy=1.0 / len(speakers), start_update=max(500, m.freeze_finetune_updates))
    unused = not m.freeze_upstream and (m.freeze_finetune_updates > 0 or m.encoder_layerdrop > 0 or not m.apply_mask)
    return TrainingSetup(model=model, objective=SpeakerIdCriterion(), train_data=train, valid_data=valid,
                         collate=SpeakerCollater(speakers), health=health, find_unused_parameters=unused,
                         summary=summary)
