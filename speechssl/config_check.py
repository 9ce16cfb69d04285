"""Valid ranges of the recipe settings, checked in one place when a config is resolved.

:func:`speechssl.config.load_config` calls :func:`check_values` on every config it builds from a recipe
and overrides, so ``speechssl config``, ``pretrain`` and ``finetune`` all refuse a bad value the same
way, before any data is read or any process started: one :class:`~speechssl.config.ConfigError`
listing every problem as ``section.key=value: what is allowed``. :func:`warnings` lists settings that
are legal but probably not what the user meant (printed, never fatal).

Three kinds of rules:

* per key (:data:`RANGES`): counts and sizes at least 1 (or 0 where 0 means "off"), probabilities in
  [0, 1), names from the set the code implements;
* every float finite (``nan`` and ``inf`` are accepted by YAML and by ``float()``);
* between keys (:func:`_relations`): dimensions that must divide, crops that must fit the batch and
  the model's receptive field.

The name sets below are the ones the implementations accept (``tests/test_config_check.py`` checks
them against the modules, which are not imported here so that ``speechssl config`` stays torch-free).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable, Optional

from speechssl.config import Config, ConfigError

Rule = Callable[[Any], Optional[str]]  # value -> None if valid, else what is allowed

TASKS = ("audio_pretraining", "hubert_pretraining", "audio_finetuning", "speaker_id")
MODELS = ("wav2vec2", "hubert", "data2vec2")
CRITERIA = ("wav2vec", "hubert", "data2vec2", "ctc", "speaker_id")
OPTIMIZERS = ("adam", "adamw")
SCHEDULES = ("polynomial_decay", "tri_stage", "cosine", "fixed")
EXTRACTOR_MODES = ("default", "group_norm", "layer_norm", "fbank")
FRAME_PADDING = ("auto", "all_samples", "conv_length")
WEIGHT_DECAY_SCOPES = ("matrices", "all")
ACTIVATIONS = ("gelu", "relu")
MASK_SELECTIONS = ("static", "uniform", "normal", "poisson")
POOLINGS = ("mean", "attentive")
LOG_FORMATS = ("tqdm", "simple", "json")
BACKENDS = ("auto", "nccl", "gloo")
PROBE_TASKS = ("sid", "asr")


def at_least(lo: float) -> Rule:
    return lambda v: None if v >= lo else f"must be >= {lo}"


def above(lo: float) -> Rule:
    return lambda v: None if v > lo else f"must be > {lo}"


def fraction(v: float) -> Optional[str]:
    return None if 0.0 <= v < 1.0 else "must be in [0, 1)"


def one_of(*names: str) -> Rule:
    return lambda v: None if v in names else f"must be one of {', '.join(names)}"


def optional(rule: Rule, meaning: str) -> Rule:
    """``rule``, or null (``meaning``: what null does)."""
    return lambda v: None if v is None else (None if rule(v) is None else f"{rule(v)}, or null ({meaning})")


def each(rule: Rule) -> Rule:
    def check(values: Any) -> Optional[str]:
        bad = [v for v in values if rule(v) is not None]
        return None if not bad else f"every value {rule(bad[0])}"

    return check


def unset_or_positive(v: float) -> Optional[str]:
    return None if v == -1 or v > 0 else "must be > 0, or -1 (unset)"


def decay(v: float) -> Optional[str]:
    return None if 0.0 <= v <= 1.0 else "must be in [0, 1] (1: the teacher stops moving)"


def non_empty(v: str) -> Optional[str]:
    return None if str(v).strip() else "must not be empty"


def device(v: str) -> Optional[str]:
    return None if re.fullmatch(r"auto|cpu|cuda(:\d+)?", v) else "must be auto, cpu, cuda or cuda:N"


def conv_layers(v: list) -> Optional[str]:
    if not v:
        return "must hold at least one (channels, kernel, stride) layer"
    bad = [layer for layer in v if min(layer) < 1]
    return None if not bad else f"channels, kernel and stride must be >= 1, got {tuple(bad[0])}"


RANGES: dict[str, dict[str, Rule]] = {
    "common": {
        "seed": at_least(0), "fp16_init_scale": at_least(1), "min_loss_scale": above(0), "log_interval": at_least(1),
        "log_format": one_of(*LOG_FORMATS), "device": device,
    },
    "task": {
        "name": one_of(*TASKS), "labels": each(non_empty), "label_rate": unset_or_positive,
        "sample_rate": at_least(1), "max_sample_size": optional(at_least(1), "no crop"),
        "min_sample_size": optional(at_least(0), "keep every utterance"), "vocab_blank_id": at_least(0),
    },
    "dataset": {
        "num_workers": at_least(0), "max_tokens": optional(at_least(1), "batches by dataset.batch_size only"),
        "batch_size": optional(at_least(1), "batches by dataset.max_tokens only"),
        "required_batch_size_multiple": at_least(1), "train_subset": non_empty, "valid_subset": non_empty,
        "validate_interval": at_least(1), "validate_interval_updates": at_least(0),
    },
    "optimization": {
        "max_update": at_least(0), "max_epoch": at_least(0), "lr": above(0), "update_freq": at_least(1),
        "clip_norm": at_least(0), "max_consecutive_nonfinite": at_least(1),
    },
    "optimizer": {
        "name": one_of(*OPTIMIZERS), "adam_betas": each(fraction), "adam_eps": above(0), "weight_decay": at_least(0),
        "weight_decay_scope": one_of(*WEIGHT_DECAY_SCOPES),
    },
    "lr_scheduler": {
        "name": one_of(*SCHEDULES), "warmup_updates": at_least(0), "end_learning_rate": at_least(0),
        "power": above(0), "total_num_update": optional(at_least(1), "optimization.max_update"),
        "phase_ratio": optional(each(lambda v: None if 0 <= v <= 1 else "must be in [0, 1]"), "tri_stage needs it"),
        "init_lr_scale": at_least(0), "final_lr_scale": above(0), "min_lr": at_least(0),
    },
    "checkpoint": {
        "save_dir": non_empty, "save_interval": at_least(1), "save_interval_updates": at_least(0),
        "keep_interval_updates": at_least(-1), "keep_last_epochs": at_least(-1),
        "keep_best_checkpoints": at_least(-1), "best_checkpoint_metric": non_empty,
    },
    "distributed_training": {
        "distributed_world_size": at_least(1), "distributed_backend": one_of(*BACKENDS), "nproc": at_least(1),
    },
    "model": {
        "name": one_of(*MODELS), "extractor_mode": one_of(*EXTRACTOR_MODES), "conv_feature_layers": conv_layers,
        "fbank_num_mel_bins": at_least(1), "fbank_stack": at_least(1), "frame_padding": one_of(*FRAME_PADDING),
        "feature_grad_mult": at_least(0), "encoder_layers": at_least(1), "encoder_embed_dim": at_least(1),
        "encoder_ffn_embed_dim": at_least(1), "encoder_attention_heads": at_least(1),
        "activation_fn": one_of(*ACTIVATIONS), "dropout": fraction, "attention_dropout": fraction,
        "activation_dropout": fraction, "encoder_layerdrop": fraction, "dropout_input": fraction,
        "dropout_features": fraction, "conv_pos": at_least(1), "conv_pos_groups": at_least(1),
        "final_dim": at_least(0), "latent_vars": at_least(1), "latent_groups": at_least(1), "latent_dim": at_least(0),
        "latent_temp": lambda t: None if t[0] > 0 and t[1] > 0 and 0 < t[2] <= 1
        else "must be (start > 0, end > 0, decay in (0, 1])",
        "mask_length": at_least(1), "mask_prob": fraction, "mask_selection": one_of(*MASK_SELECTIONS),
        "mask_other": at_least(0), "mask_min_space": at_least(0), "mask_dropout": fraction,
        "mask_channel_length": at_least(1), "mask_channel_prob": fraction,
        "mask_channel_selection": one_of(*MASK_SELECTIONS), "mask_channel_other": at_least(0),
        "mask_channel_min_space": at_least(0), "num_negatives": at_least(0), "cross_sample_negatives": at_least(0),
        "codebook_negatives": at_least(0), "logit_temp": above(0), "num_classes": each(at_least(1)),
        "label_rate": unset_or_positive, "final_dropout": fraction, "freeze_finetune_updates": at_least(0),
        "projector_dim": at_least(0), "pooling": one_of(*POOLINGS),
        "conv_pos_depth": at_least(1), "conv_pos_width": at_least(1), "prenet_depth": at_least(0),
        "clone_batch": at_least(1), "mask_prob_adjust": at_least(0), "mask_noise_std": at_least(0),
        "decoder_dim": at_least(1), "decoder_layers": at_least(1), "decoder_kernel": at_least(1),
        "decoder_groups": at_least(1), "decoder_input_dropout": fraction, "average_top_k_layers": at_least(1),
        "ema_decay": decay, "ema_end_decay": decay, "ema_anneal_end_step": at_least(0), "loss_beta": at_least(0),
        "loss_scale": optional(above(0), "1 / sqrt(model.encoder_embed_dim)"), "min_target_var": at_least(0),
        "min_pred_var": at_least(0),
    },
    "probe": {
        "task": one_of(*PROBE_TASKS), "interval_updates": at_least(0), "updates": at_least(0),
        "max_train_utterances": at_least(0), "seed": at_least(0),
    },
    "criterion": {
        "name": one_of(*CRITERIA), "loss_weights": each(at_least(0)), "pred_masked_weight": at_least(0),
        "pred_nomask_weight": at_least(0),
    },
}


def receptive_field(layers: list[tuple[int, int, int]]) -> int:
    """Fewest input samples the conv stack turns into one frame."""
    n = 1
    for _, kernel, stride in reversed(layers):
        n = (n - 1) * stride + kernel
    return n


def shortest_input(m: Any) -> tuple[int, str]:
    """``(samples, what)``: the fewest input samples the front-end of model config ``m`` makes a frame of."""
    if m.extractor_mode == "fbank":  # 25 ms windows every 10 ms at 16 kHz, fbank_stack of them per frame
        return 400 + (m.fbank_stack - 1) * 160, "of the log-mel front-end (model.fbank_stack windows)"
    return receptive_field(m.conv_feature_layers), "the receptive field of model.conv_feature_layers"


def _floats(value: Any) -> list[float]:
    if isinstance(value, float):
        return [value]
    if isinstance(value, (list, tuple)):
        return [x for v in value for x in _floats(v)]
    return []


def _show(value: Any) -> str:
    return f"[{', '.join(map(str, value))}]" if isinstance(value, (list, tuple)) else str(value)


def _per_key(cfg: Config) -> list[str]:
    problems = []
    for section in dataclasses.fields(cfg):
        body = getattr(cfg, section.name)
        rules = RANGES.get(section.name, {})
        for f in dataclasses.fields(body):
            value = getattr(body, f.name)
            key = f"{section.name}.{f.name}"
            if isinstance(value, str) and value == "???":
                continue  # required, unset: require_set() reports it where a run needs it
            if any(not math.isfinite(x) for x in _floats(value)):
                problems.append(f"{key}={_show(value)}: must be a finite number")
                continue
            rule = rules.get(f.name)
            why = rule(value) if rule is not None else None
            if why:
                problems.append(f"{key}={_show(value)}: {why}")
    return problems


def _relations(cfg: Config) -> list[str]:
    problems = []
    m, t, d = cfg.model, cfg.task, cfg.dataset
    heads, groups = max(1, m.encoder_attention_heads), max(1, m.conv_pos_groups)
    if m.encoder_embed_dim % heads:
        problems.append(f"model.encoder_embed_dim={m.encoder_embed_dim}: must be divisible by "
                        f"model.encoder_attention_heads={m.encoder_attention_heads}")
    if m.encoder_embed_dim % groups:
        problems.append(f"model.encoder_embed_dim={m.encoder_embed_dim}: must be divisible by "
                        f"model.conv_pos_groups={m.conv_pos_groups}")
    if m.name == "wav2vec2" and m.quantize_targets and m.latent_groups >= 1:
        vq_dim = m.latent_dim or m.final_dim or m.encoder_embed_dim
        if vq_dim % m.latent_groups:
            problems.append(f"model.latent_dim={m.latent_dim} (0: final_dim={m.final_dim}): the codevector size "
                            f"{vq_dim} must be divisible by model.latent_groups={m.latent_groups}")
    if t.name == "audio_pretraining" and m.name == "wav2vec2" and m.num_negatives < 1:
        problems.append(f"model.num_negatives={m.num_negatives}: wav2vec 2.0 pretraining needs >= 1 distractor")
    if m.name == "data2vec2":
        problems += _data2vec2_relations(cfg)
    if t.max_sample_size is not None and t.max_sample_size >= 1:
        if m.w2v_path is None:  # fine-tuning from a checkpoint: its front-end, not the recipe's
            shortest, what = shortest_input(m)
            if t.max_sample_size < shortest:
                problems.append(f"task.max_sample_size={t.max_sample_size}: must be >= {shortest}, {what} (one "
                                "frame), or null (no crop)")
        if d.max_tokens is not None and t.max_sample_size > d.max_tokens >= 1:
            problems.append(f"task.max_sample_size={t.max_sample_size} exceeds dataset.max_tokens={d.max_tokens}: "
                            "one crop would not fit in a batch; lower task.max_sample_size or raise dataset.max_tokens")
    return problems


def _data2vec2_relations(cfg: Config) -> list[str]:
    m, t = cfg.model, cfg.task
    problems = []
    if m.prenet_depth >= m.encoder_layers:
        problems.append(f"model.prenet_depth={m.prenet_depth}: must be < model.encoder_layers={m.encoder_layers} "
                        "(the prenet is the first prenet_depth of the encoder's layers)")
    elif m.average_top_k_layers > m.encoder_layers - m.prenet_depth:
        problems.append(f"model.average_top_k_layers={m.average_top_k_layers}: the targets average the top layers "
                        f"after the prenet, at most model.encoder_layers - model.prenet_depth = "
                        f"{m.encoder_layers - m.prenet_depth}")
    for key in ("encoder_embed_dim", "decoder_dim"):
        if getattr(m, key) % max(1, m.decoder_groups):
            problems.append(f"model.{key}={getattr(m, key)}: must be divisible by model.decoder_groups={m.decoder_groups}")
    if m.mask_prob + m.mask_prob_adjust >= 1 and t.name == "audio_pretraining":
        problems.append(f"model.mask_prob={m.mask_prob} + model.mask_prob_adjust={m.mask_prob_adjust}: must be < 1")
    if m.layer_norm_first:
        problems.append("model.layer_norm_first=true: speechssl's data2vec 2.0 is post-LN, as the published audio models")
    if t.name == "audio_pretraining":
        if cfg.criterion.name != "data2vec2":
            problems.append(f"criterion.name={cfg.criterion.name}: data2vec 2.0 pretraining (model.name=data2vec2) "
                            "uses criterion.name=data2vec2")
        if t.enable_padding:
            problems.append("task.enable_padding=true: data2vec 2.0 pretraining crops every batch to its shortest "
                            "utterance (the student encodes as many frames of every row); set it false")
    return problems


def check_values(cfg: Config) -> None:
    """Raise ConfigError listing every out-of-range setting of ``cfg`` (key, value, what is allowed)."""
    problems = _per_key(cfg)
    if not problems:  # relations assume every single value is in range
        problems = _relations(cfg)
    if len(problems) == 1:
        raise ConfigError(problems[0])
    if problems:
        raise ConfigError("invalid settings:\n  " + "\n  ".join(problems))


def warnings(cfg: Config) -> list[str]:
    """Legal settings that are probably a slip; each a sentence naming the keys."""
    out = []
    o, s = cfg.optimization, cfg.lr_scheduler
    total = s.total_num_update or o.max_update
    if s.name in ("polynomial_decay", "cosine", "fixed") and 0 < total <= s.warmup_updates:
        out.append(f"lr_scheduler.warmup_updates={s.warmup_updates} >= {total} updates "
                   f"({'lr_scheduler.total_num_update' if s.total_num_update else 'optimization.max_update'}): the "
                   f"warm-up is cut short, the learning rate never reaches optimization.lr={o.lr:g} (as in fairseq); "
                   "fine for a smoke test")
    return out

