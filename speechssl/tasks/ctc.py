"""CTC fine-tuning task (fairseq's ``audio_finetuning`` + ``ctc`` criterion + ``Wav2VecCtc``).

:func:`build_ctc_finetuning` turns a recipe into a :class:`~speechssl.train.loop.TrainingSetup`:

* targets: ``task.labels: [ltr]`` -> letters of ``<split>.ltr`` with ``dict.ltr.txt``; ``[wrd]`` ->
  ``<split>.wrd`` encoded with the sentencepiece model ``task.spm_model``. The symbol list is written
  into ``task.vocab`` (fairseq dictionary order, blank ``<s>`` = 0) and so saved in every checkpoint;
* model: :class:`~speechssl.models.ctc.Wav2VecCtc` on the upstream of ``model.w2v_path`` (its
  architecture, with the recipe's dropout / masking / LayerDrop / freezing settings), or on the recipe's
  own architecture trained from scratch when ``w2v_path`` is unset. ``cfg.model`` is replaced by the
  resolved architecture so the checkpoints are self-contained;
* whole utterances, padded (``task.enable_padding``), never cropped;
* the blank-output health alarm.

Validation computes greedy-decoding WER/CER (``wer``, ``cer`` in the valid records); with
``checkpoint.best_checkpoint_metric: wer`` the best checkpoint is the lowest-WER one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from speechssl.config import Config, ConfigError
from speechssl.data.dataset import AudioDataset, ManifestError, collate, dataset_for_split
from speechssl.text.vocab import KINDS, PAD, Vocabulary


def build_vocabulary(cfg: Config) -> Vocabulary:
    """The task's vocabulary: ``task.vocab`` if set (resume, evaluation), else from ``dict.ltr.txt`` /
    ``task.spm_model``; writes the symbols into ``cfg.task.vocab``."""
    t = cfg.task
    if len(t.labels) != 1 or t.labels[0] not in KINDS:
        raise ConfigError(f"task.labels={list(t.labels)}: CTC fine-tuning needs exactly one of [ltr] (letters with "
                          "dict.ltr.txt) or [wrd] (sentencepiece units, with task.spm_model)")
    label = t.labels[0]
    if t.vocab_specials:
        raise ConfigError("task.vocab_specials is set (a vocabulary imported from transformers); CTC fine-tuning "
                          "trains fairseq-order vocabularies: fine-tune the imported model's upstream "
                          "(model.w2v_path) with a new dict.ltr.txt instead")
    if t.vocab:
        return Vocabulary.for_labels(label, t.vocab, t.spm_model)
    if label == "ltr":
        vocab = Vocabulary.from_dict_file(Path(t.label_dir or t.data) / "dict.ltr.txt")
    else:
        if not t.spm_model:
            raise ConfigError("task.labels=[wrd] needs task.spm_model (make one with 'speechssl spm train "
                              f"{Path(t.data) / 'train.wrd'} --out DIR/spm_unigram100')")
        vocab = Vocabulary.from_spm(t.spm_model)
    t.vocab = list(vocab.symbols)
    return vocab


class CtcCollater:
    """:func:`~speechssl.data.dataset.collate` plus CTC targets.

    Adds ``target`` (LongTensor ``(B, S)``, padded with ``<pad>``), ``target_lengths`` (``(B,)``) and
    ``target_text`` (reference words per item, for validation WER).
    """

    def __init__(self, vocab: Vocabulary):
        self.vocab = vocab

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        batch = collate(items)
        lines = [it["labels"][0] for it in items]
        ids = [self.vocab.encode(line) for line in lines]
        lengths = torch.tensor([len(x) for x in ids], dtype=torch.long)
        target = torch.full((len(ids), max(1, int(lengths.max()))), PAD, dtype=torch.long)
        for row, x in zip(target, ids):
            row[: len(x)] = torch.tensor(x, dtype=torch.long)
        batch.update(target=target, target_lengths=lengths, target_text=[self.vocab.decode(x) for x in ids])
        return batch


def ctc_dataset(cfg: Config, split: str, vocab: Vocabulary) -> AudioDataset:
    """``task.data/<split>.tsv`` with its ``.ltr`` / ``.wrd`` labels; errors name the missing file."""
    label = cfg.task.labels[0]
    label_dir = Path(cfg.task.label_dir or cfg.task.data)
    if not (label_dir / f"{split}.{label}").is_file():
        raise ManifestError(f"{label_dir / f'{split}.{label}'}: label file not found; CTC fine-tuning needs "
                            f"transcripts for the '{split}' split (make the manifest from transcribed audio, see "
                            "manifests/README.md)")
    data = dataset_for_split(cfg, split, [label])
    if cfg.task.max_sample_size is not None and (data.sizes > cfg.task.max_sample_size).any():
        n = int((data.sizes > cfg.task.max_sample_size).sum())
        raise ConfigError(f"{data.manifest.path}: {n} utterance(s) longer than task.max_sample_size="
                          f"{cfg.task.max_sample_size}; cropping would cut their transcripts: unset it for fine-tuning")
    if vocab.kind == "letter":
        unknown = sorted({u for line in data.labels[0] for u in vocab.unknown_symbols(line)})
        if unknown:
            print(f"warning: {data.manifest.path}: symbols not in the vocabulary become <unk>: {' '.join(unknown)}")
    return data


def build_ctc_finetuning(cfg: Config):
    """Model, CTC objective, datasets, collater and blank alarm of CTC fine-tuning (a TrainingSetup)."""
    from speechssl.models.ctc import build_ctc_model, resolve_finetune_config
    from speechssl.objectives.ctc import CtcCriterion
    from speechssl.train.loop import TrainingSetup
    from speechssl.train.metrics import HealthMonitor

    if not cfg.task.enable_padding:
        raise ConfigError("CTC fine-tuning reads whole utterances: set task.enable_padding=true")
    check_deterministic(cfg)
    if cfg.criterion.name != "ctc":
        raise ConfigError(f"task.name=audio_finetuning needs criterion.name=ctc, got '{cfg.criterion.name}'")
    vocab = build_vocabulary(cfg)
    # resolve the upstream's architecture into cfg.model: saved with every checkpoint
    # model.no_pretrained_weights with model.w2v_path: the upstream's architecture, randomly initialised (the
    # from-scratch baseline of an experiment, without spelling the architecture out)
    random_init = bool(cfg.model.w2v_path) and cfg.model.no_pretrained_weights
    pretrained = bool(cfg.model.w2v_path) and not random_init
    cfg.model = resolve_finetune_config(cfg.model, None if random_init else cfg.task.normalize)
    cfg.model.no_pretrained_weights = random_init
    model = build_ctc_model(cfg.model, len(vocab), load_upstream=pretrained)
    train = ctc_dataset(cfg, cfg.dataset.train_subset, vocab)
    valid = None if cfg.dataset.disable_validation else ctc_dataset(cfg, cfg.dataset.valid_subset, vocab)
    health = HealthMonitor(blank_alarm_update=blank_alarm_start(cfg))
    m = cfg.model
    summary = [
        f"fine-tuning: {'upstream ' + str(m.w2v_path) if pretrained else 'from scratch (the architecture of ' + str(m.w2v_path) + ', random weights)' if random_init else 'from scratch (no model.w2v_path)'}, "
        f"{m.name} {m.encoder_layers}x{m.encoder_embed_dim}; {vocab.kind} vocabulary of {len(vocab)} symbols; "
        f"upstream frozen for {m.freeze_finetune_updates} updates; feature extractor "
        f"{'frozen' if m.feature_grad_mult == 0 else f'trained (feature_grad_mult {m.feature_grad_mult})'}",
    ]
    return TrainingSetup(
        model=model, objective=CtcCriterion(vocab, cfg.criterion.zero_infinity, cfg.optimization.sentence_avg,
                                                blank_alarm_update=blank_alarm_start(cfg)),
        train_data=train, valid_data=valid, collate=CtcCollater(vocab), health=health,
        find_unused_parameters=may_leave_parameters_unused(cfg.model), summary=summary,
    )


def may_leave_parameters_unused(m) -> bool:
    """Whether a CTC fine-tuning step can leave a parameter of the model ``m`` (its ModelConfig) without
    gradient, so that DDP must look for them every step: the upstream frozen for the first updates,
    LayerDrop, or no time masking (``mask_emb`` unused). The extractor frozen by ``feature_grad_mult: 0``
    has ``requires_grad`` off: DDP does not wait for it."""
    return m.freeze_finetune_updates > 0 or m.encoder_layerdrop > 0 or not (m.apply_mask and m.mask_prob > 0)


def check_deterministic(cfg: Config) -> None:
    """``common.deterministic`` with CTC on CUDA is refused: torch's ``ctc_loss`` has no deterministic CUDA
    backward, so ``torch.use_deterministic_algorithms`` would stop the run at its first update."""
    from speechssl.train import distributed

    if cfg.common.deterministic and distributed.select_device(cfg.common).type == "cuda":
        raise ConfigError("common.deterministic=true cannot hold for CTC fine-tuning on CUDA: torch's ctc_loss has "
                          "no deterministic CUDA backward (the run would stop at its first update). Set "
                          "common.deterministic=false, or fine-tune on the CPU (common.device=cpu)")


def blank_alarm_start(cfg: Config) -> int:
    """Update after which emitting only blanks raises the health alarm: 2,000 updates after the upstream
    is unfrozen, or at 60% of the run for shorter runs (but never while it is still frozen)."""
    freeze = max(cfg.model.freeze_finetune_updates, 0)
    return freeze + min(2000, max(100, int(0.6 * (cfg.optimization.max_update - freeze))))
