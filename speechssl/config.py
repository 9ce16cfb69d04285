"""Recipes: YAML files mapped onto typed, nested dataclasses.

A recipe is a YAML mapping of *sections* (``common``, ``task``, ``dataset``, ``optimization``,
``optimizer``, ``lr_scheduler``, ``checkpoint``, ``distributed_training``, ``model``, ``criterion``) to
keys. Section and key names are fairseq's (``fairseq/dataclass/configs.py`` and the model dataclasses)
wherever fairseq has the same setting, so fairseq hydra configs carry over with few edits; see
``recipes/README.md`` for the mapping and for the settings fairseq does not have.

Loading rules (all in :func:`load_config`):

* ``base: other.yaml`` at the top of a recipe extends another recipe (path relative to the file, or a
  bare name found in the recipe directory); mappings merge key by key, the child wins, lists replace.
* Every key is checked against the dataclasses: an unknown key is an error naming the key, the file and
  the closest valid key; a value of the wrong type is an error naming the expected type.
* Command-line overrides ``section.key=value`` are parsed as YAML scalars/lists and typed the same way
  (``model.conv_feature_layers="[(512,10,5)]*2"``, ``common.bf16=true``, ``optimization.lr=[5e-4]``).
* fairseq spellings are accepted where fairseq uses them: ``_name`` for ``name``, one-element lists for
  ``optimization.lr`` / ``optimization.update_freq``, strings such as ``"(0.9,0.98)"`` for tuples and
  fairseq's ``conv_feature_layers`` expression strings.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from speechssl.utils.io import atomic_write_text

RECIPE_DIR = Path(__file__).resolve().parent.parent / "recipes"


class ConfigError(ValueError):
    """A recipe or override is invalid. The message names the file/key and what to do."""


MISSING = "???"  # fairseq/omegaconf's marker for a value the user must set (e.g. task.data: ???)


# --------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------


@dataclass
class CommonConfig:
    seed: int = 1
    fp16: bool = False  # fp16 autocast + dynamic loss scaling (CUDA only)
    bf16: bool = False  # bf16 autocast (CPU and CUDA)
    fp16_init_scale: int = 128  # initial loss scale of fp16 dynamic loss scaling
    min_loss_scale: float = 1e-4  # abort when the fp16 loss scale falls below this (loss exploding)
    log_interval: int = 100  # updates between progress/metrics lines
    log_format: str = "tqdm"  # tqdm (progress bar) | simple | json (lines on stdout)
    tensorboard_logdir: Optional[str] = None  # default: <checkpoint.save_dir>/tb
    # not in fairseq:
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    deterministic: bool = False  # torch.use_deterministic_algorithms, for exact-resume checks
    compile: bool = False  # torch.compile each Transformer layer (dynamic shapes; the rest stays eager)


@dataclass
class TaskConfig:
    # audio_pretraining (wav2vec 2.0, or data2vec 2.0 with model.name data2vec2, as fairseq) | hubert_pretraining
    # | audio_finetuning | speaker_id
    name: str = "audio_pretraining"
    data: str = ""  # manifest directory (train.tsv, valid.tsv, label files)
    labels: list[str] = field(default_factory=list)  # label file extensions, e.g. [ltr] or [km]
    label_dir: Optional[str] = None  # where label files live when not beside the TSVs
    label_rate: float = -1.0  # labels per second (HuBERT: 100 for MFCC, 50 for layer features)
    sample_rate: int = 16000
    normalize: bool = False  # zero-mean unit-variance per utterance (LARGE)
    enable_padding: bool = False  # pad to the longest in the batch instead of cropping to the shortest
    max_sample_size: Optional[int] = None  # random crop to at most this many samples
    min_sample_size: Optional[int] = None  # drop utterances shorter than this
    random_crop: bool = True
    # CTC fine-tuning: output symbols (fairseq dictionary order, blank "<s>" first), filled from
    # dict.ltr.txt or the sentencepiece model when empty and saved in the checkpoint
    vocab: list[str] = field(default_factory=list)
    spm_model: Optional[str] = None  # sentencepiece model for task.labels=[wrd] (speechssl spm train)
    # a CTC vocabulary imported from transformers in another layout than fairseq's: its tokenizer's
    # [pad (= the blank), unk, bos, eos] tokens, and the blank's id there; task.vocab then holds the
    # blank first and the other symbols in their original order (empty / 0: fairseq's layout)
    vocab_specials: list[str] = field(default_factory=list)
    vocab_blank_id: int = 0


@dataclass
class DatasetConfig:
    num_workers: int = 1
    max_tokens: Optional[int] = None  # audio samples per batch, padding included
    batch_size: Optional[int] = None
    required_batch_size_multiple: int = 8
    train_subset: str = "train"
    valid_subset: str = "valid"
    validate_interval: int = 1  # epochs
    validate_interval_updates: int = 0
    disable_validation: bool = False
    skip_invalid_size_inputs_valid_test: bool = False


@dataclass
class OptimizationConfig:
    max_update: int = 0
    max_epoch: int = 0
    lr: float = 5e-4  # fairseq writes [5e-4]; both accepted
    update_freq: int = 1  # gradient accumulation; fairseq writes [1]
    clip_norm: float = 0.0
    sentence_avg: bool = False
    # not in fairseq: abort after this many consecutive updates skipped for a non-finite loss/gradient
    max_consecutive_nonfinite: int = 10


@dataclass
class OptimizerConfig:
    name: str = "adam"  # adam (decoupled weight decay, i.e. AdamW, as fairseq's adam) | adamw
    adam_betas: tuple[float, float] = (0.9, 0.98)
    adam_eps: float = 1e-6
    weight_decay: float = 0.01
    # not in fairseq: which parameters decay: matrices (weight matrices and conv kernels; biases, norm
    # affines, mask_emb and weight-norm magnitudes are exempt) | all (every parameter, as fairseq's adam)
    weight_decay_scope: str = "matrices"


@dataclass
class LRSchedulerConfig:
    name: str = "polynomial_decay"  # polynomial_decay | tri_stage | cosine | fixed
    warmup_updates: int = 0
    # polynomial_decay
    end_learning_rate: float = 0.0
    power: float = 1.0
    total_num_update: Optional[int] = None  # default: optimization.max_update
    # tri_stage
    phase_ratio: Optional[tuple[float, float, float]] = None
    init_lr_scale: float = 0.01
    final_lr_scale: float = 0.01
    # cosine
    min_lr: float = 0.0


@dataclass
class CheckpointConfig:
    save_dir: str = "checkpoints"
    save_interval: int = 1  # epochs
    save_interval_updates: int = 0
    keep_interval_updates: int = -1  # keep the last K update checkpoints (-1 or 0: all, as fairseq)
    keep_last_epochs: int = -1
    keep_best_checkpoints: int = -1
    no_epoch_checkpoints: bool = False
    best_checkpoint_metric: str = "loss"
    maximize_best_checkpoint_metric: bool = False
    # not in fairseq:
    restart: bool = False  # start over even if save_dir holds a checkpoint (needs --force to overwrite)


@dataclass
class DistributedTrainingConfig:
    distributed_world_size: int = 1  # total processes; torchrun sets it from WORLD_SIZE
    distributed_backend: str = "auto"  # auto (nccl on CUDA, gloo on CPU) | nccl | gloo
    find_unused_parameters: bool = False
    # not in fairseq:
    nproc: int = 1  # convenience: spawn this many local processes (prefer torchrun)


ConvLayers = list[tuple[int, int, int]]
BASE_CONV_LAYERS: ConvLayers = [(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512, 2, 2)] * 2


@dataclass
class ModelConfig:
    """wav2vec 2.0 / HuBERT / data2vec 2.0 model settings, named as fairseq's Wav2Vec2Config / HubertConfig /
    Data2VecMultiConfig (+ its audio modality's D2vAudioConfig).

    The defaults are wav2vec 2.0 BASE's, and data2vec 2.0 BASE's for the data2vec 2.0 settings (see
    ``../shared/reference/recipes.md``).
    """

    name: str = "wav2vec2"  # wav2vec2 | hubert | data2vec2
    # feature extractor
    extractor_mode: str = "default"  # default (= group_norm: BASE) | layer_norm (LARGE) | fbank (log-mel)
    conv_feature_layers: ConvLayers = field(default_factory=lambda: list(BASE_CONV_LAYERS))
    fbank_num_mel_bins: int = 80  # extractor_mode fbank: Kaldi log-mel filterbanks every 10 ms ...
    fbank_stack: int = 2  # ... with this many consecutive frames concatenated (2: 20 ms frames)
    fbank_standardize: bool = False  # ... each utterance's bins to zero mean, unit variance (w2v-BERT)
    conv_bias: bool = False
    feature_grad_mult: float = 0.1
    # transformer
    encoder_layers: int = 12
    encoder_embed_dim: int = 768
    encoder_ffn_embed_dim: int = 3072
    encoder_attention_heads: int = 12
    activation_fn: str = "gelu"
    layer_norm_first: bool = False
    dropout: float = 0.1
    attention_dropout: float = 0.1
    activation_dropout: float = 0.0
    encoder_layerdrop: float = 0.05
    dropout_input: float = 0.1
    dropout_features: float = 0.1
    conv_pos: int = 128
    conv_pos_groups: int = 16
    # targets / quantizer
    final_dim: int = 256
    quantize_targets: bool = True
    latent_vars: int = 320
    latent_groups: int = 2
    latent_dim: int = 0  # 0: final_dim (codevector dim = latent_dim / latent_groups)
    latent_temp: tuple[float, float, float] = (2.0, 0.5, 0.999995)  # start, end, decay per update
    # masking
    mask_length: int = 10
    mask_prob: float = 0.65
    mask_selection: str = "static"
    mask_other: float = 0.0
    no_mask_overlap: bool = False
    mask_min_space: int = 1
    require_same_masks: bool = True  # every utterance masks as many frames as the least-masked one
    mask_dropout: float = 0.0  # fraction of masked frames unmasked again, per utterance
    mask_channel_length: int = 10
    mask_channel_prob: float = 0.0
    mask_channel_selection: str = "static"
    mask_channel_other: float = 0.0
    no_mask_channel_overlap: bool = False
    mask_channel_min_space: int = 1
    # negatives / logits
    num_negatives: int = 100
    negatives_from_everywhere: bool = False
    cross_sample_negatives: int = 0
    codebook_negatives: int = 0
    logit_temp: float = 0.1
    # HuBERT
    skip_masked: bool = False
    skip_nomask: bool = False
    untie_final_proj: bool = False
    # classes per label set (the lines of dict.<label>.txt); filled from the dictionaries by the
    # hubert_pretraining task and saved in checkpoints, so a checkpoint rebuilds without them
    num_classes: list[int] = field(default_factory=list)
    # labels per second (fairseq's HubertConfig.label_rate = ${task.label_rate}); -1: take task.label_rate
    label_rate: float = -1.0
    # sample -> frame padding mask: auto (fairseq's rule of the model: all_samples for HuBERT, conv_length
    # for wav2vec 2.0) | all_samples (a frame is padding only if every sample of its stride window is:
    # fairseq's HubertModel) | conv_length (frames past the conv output length of the valid samples:
    # fairseq's Wav2Vec2Model, torchaudio, transformers)
    frame_padding: str = "auto"
    # data2vec 2.0 (name data2vec2; speechssl/models/data2vec2.py). The encoder reuses encoder_layers (all of
    # them, fairseq's prenet_depth + depth), encoder_embed_dim, encoder_ffn_embed_dim, encoder_attention_heads,
    # dropout (fairseq's encoder_dropout = post_mlp_drop = prenet_dropout), attention_dropout,
    # activation_dropout, encoder_layerdrop (layerdrop = prenet_layerdrop), dropout_input, mask_prob, mask_length
    conv_pos_depth: int = 5  # positional encoder: conv_pos_depth grouped convolutions (conv_pos_groups) ...
    conv_pos_width: int = 95  # ... of kernel max(3, conv_pos_width // conv_pos_depth) each (19 for BASE)
    # zero padded frames before the positional convolutions: transformers' data2vec audio (and fairseq's
    # data2vec 1.0) do; fairseq's data2vec 2.0 does not (false). Pretraining batches are never padded
    pos_conv_zero_padding: bool = False
    use_alibi_encoder: bool = True  # ALiBi attention bias: -slope_h * |i - j|, fairseq's get_alibi slopes ...
    learned_alibi_scale: bool = True  # ... times a learned scale (clamped at 0) ...
    learned_alibi_scale_per_head: bool = True  # ... one per attention head
    prenet_depth: int = 0  # the first prenet_depth of encoder_layers are fairseq's modality prenet (LARGE: 8)
    clone_batch: int = 8  # masked copies of every utterance the student encodes; the teacher runs once
    mask_prob_adjust: float = 0.05  # block mask: int(L * (mask_prob + adjust) / mask_length) spans, then
    #                                  exactly int(L * mask_prob) masked frames per copy (compute_block_mask_1d)
    mask_noise_std: float = 0.01  # decoder input at masked frames (and masked frames when fine-tuning): N(0, std)
    decoder_dim: int = 384  # convolutional decoder: decoder_layers x [grouped Conv1d(decoder_kernel,
    decoder_layers: int = 4  # decoder_groups) -> LayerNorm (no affine) -> GELU], residual where the
    decoder_kernel: int = 7  # channel counts match, then Linear(decoder_dim, encoder_embed_dim)
    decoder_groups: int = 16
    decoder_input_dropout: float = 0.1  # fairseq's decoder.input_dropout
    average_top_k_layers: int = 8  # targets: mean of the teacher's top K layers (FFN outputs) ...
    instance_norm_target_layer: bool = True  # ... each instance-normalised over time ...
    layer_norm_target_layer: bool = False  # ... or layer-normalised over channels ...
    instance_norm_targets: bool = False  # ... and the mean instance-normalised ...
    layer_norm_targets: bool = False  # ... or layer-normalised
    ema_decay: float = 0.999  # teacher = EMA of the student encoder; decay annealed linearly from ema_decay ...
    ema_end_decay: float = 0.99999  # ... to ema_end_decay ...
    ema_anneal_end_step: int = 75000  # ... over this many updates (fairseq's default: optimization.max_update)
    loss_beta: float = 0.0  # 0: squared error; > 0: smooth L1 with this beta
    loss_scale: Optional[float] = None  # per-element loss scale; null: 1 / sqrt(encoder_embed_dim)
    min_target_var: float = 0.1  # health alarm: target (pred) standard deviation per channel, averaged,
    min_pred_var: float = 0.01  # below these = collapse (fairseq stops the run after 5000 updates)
    # fine-tuning (fairseq's Wav2Vec2AsrConfig names; see speechssl/tasks/ctc.py)
    w2v_path: Optional[str] = None  # pretrained checkpoint; None: train the same architecture from scratch
    apply_mask: bool = True  # time/channel masking of the upstream during fine-tuning
    final_dropout: float = 0.0  # dropout before the output layer
    freeze_finetune_updates: int = 0  # updates during which only the output layer trains
    no_pretrained_weights: bool = False  # with w2v_path: its architecture, random weights (a baseline)
    # speaker ID (task.name speaker_id; see speechssl/tasks/speaker_id.py and speechssl/models/speaker.py)
    freeze_upstream: bool = False  # SUPERB: only the head learns; the upstream stays in eval mode, no grad
    projector_dim: int = 256  # head: Linear(D, projector_dim) on the layer-weighted sum (s3prl); 0: none
    pooling: str = "mean"  # head: mean (masked mean) | attentive (attentive statistics: mean + std)


@dataclass
class CriterionConfig:
    name: str = "wav2vec"  # wav2vec | hubert | data2vec2 | ctc | speaker_id
    infonce: bool = True
    loss_weights: list[float] = field(default_factory=lambda: [0.1, 10.0])  # diversity, feature penalty
    log_keys: list[str] = field(default_factory=lambda: ["prob_perplexity", "code_perplexity", "temp"])
    # hubert
    pred_masked_weight: float = 1.0
    pred_nomask_weight: float = 0.0
    # ctc
    zero_infinity: bool = True


@dataclass
class ProbeSettings:
    """Not in fairseq: a cheap frozen-upstream probe of the model being pretrained, run at validation
    points and logged with the validation record (``probe_cer`` / ``probe_wer`` or ``probe_accuracy``),
    so the curves show representation quality, not only the pretext loss (speechssl/tasks/probe.py)."""

    data: Optional[str] = None  # manifest dir: train / valid with .ltr + .wrd (asr) or .spk (sid); None: off
    task: str = "sid"  # sid (mean pooling + linear: seconds) | asr (BiLSTM + CTC: about a minute)
    interval_updates: int = 0  # probe at the validation points every this many updates (0: at every one)
    updates: int = 0  # downstream updates (0: 300 asr, 300 sid)
    max_train_utterances: int = 0  # probe-training utterances (0: all)
    seed: int = 0


@dataclass
class Config:
    common: CommonConfig = field(default_factory=CommonConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    optimization: OptimizationConfig = field(default_factory=OptimizationConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    lr_scheduler: LRSchedulerConfig = field(default_factory=LRSchedulerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    distributed_training: DistributedTrainingConfig = field(default_factory=DistributedTrainingConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    criterion: CriterionConfig = field(default_factory=CriterionConfig)
    probe: ProbeSettings = field(default_factory=ProbeSettings)

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))


# Keys fairseq spells differently, per section: fairseq name -> speechssl name.
ALIASES: dict[str, str] = {"_name": "name", "layerdrop": "encoder_layerdrop"}


# --------------------------------------------------------------------------------------------------
# Type coercion
# --------------------------------------------------------------------------------------------------

_ALLOWED_BINOPS = (ast.Add, ast.Mult, ast.Sub, ast.USub)


def parse_literal(text: str) -> Any:
    """Evaluate a literal expression safely: numbers, strings, lists, tuples, and ``+``/``*`` on them.

    Enough for fairseq's ``conv_feature_layers`` strings (``"[(512, 10, 5)] + [(512, 3, 2)] * 4"``)
    and tuple strings such as ``"(0.9, 0.98)"``; names, calls and attributes are refused.
    """

    def ev(node: ast.AST) -> Any:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float, str, bool, type(None))):
            return node.value
        if isinstance(node, ast.List):
            return [ev(e) for e in node.elts]
        if isinstance(node, ast.Tuple):
            return tuple(ev(e) for e in node.elts)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -ev(node.operand)
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult, ast.Sub)):
            left, right = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Add):
                return left + right
            if isinstance(node.op, ast.Sub):
                return left - right
            if isinstance(left, (list, tuple)) and isinstance(right, int) and right > 10_000:
                raise ValueError("repetition count too large")
            return left * right
        raise ValueError(f"not a literal: {ast.dump(node)[:60]}")

    return ev(ast.parse(text.strip(), mode="eval"))


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " or null"
    if origin in (list, tuple):
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            return f"a list of {len(args)} values ({', '.join(_type_name(a) for a in args)})"
        return f"a list of {_type_name(args[0])}" if args else "a list"
    return getattr(tp, "__name__", str(tp))


def coerce(value: Any, tp: Any, where: str) -> Any:
    """Return ``value`` converted to type ``tp`` or raise ConfigError naming ``where``."""
    try:
        return _coerce(value, tp)
    except (TypeError, ValueError, SyntaxError) as exc:
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r} ({exc})") from None


def _coerce(value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~")):
            if type(None) in args:
                return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg)
            except (TypeError, ValueError, SyntaxError) as exc:
                errors.append(str(exc))
        raise ValueError("; ".join(errors))
    if tp is Any:
        return value
    if origin in (list, tuple):
        if isinstance(value, str):
            value = parse_literal(value)
        if not isinstance(value, (list, tuple)):
            raise TypeError("not a list")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ValueError(f"needs {len(args)} values, has {len(value)}")
            return tuple(_coerce(v, a) for v, a in zip(value, args))
        inner = args[0] if args else Any
        out = [_coerce(v, inner) for v in value]
        return tuple(out) if origin is tuple else out
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise TypeError("not a boolean (true/false)")
    if tp is int:
        if isinstance(value, bool):
            raise TypeError("boolean given")
        if isinstance(value, list) and len(value) == 1:  # fairseq's update_freq: [1]
            value = value[0]
        if isinstance(value, int):
            return value
        if isinstance(value, (float, str)):
            f = float(value)
            if not f.is_integer():
                raise ValueError("not an integer")
            return int(f)
        raise TypeError("not an integer")
    if tp is float:
        if isinstance(value, bool):
            raise TypeError("boolean given")
        if isinstance(value, list) and len(value) == 1:  # fairseq's lr: [0.0005]
            value = value[0]
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            return float(value)
        raise TypeError("not a number")
    if tp is str:
        if isinstance(value, (dict, list)):
            raise TypeError("not a string")
        return str(value)
    raise TypeError(f"unsupported type {tp}")


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def _fields(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


SECTIONS: dict[str, type] = _fields(Config)


def _closest(name: str, choices: list[str]) -> str:
    match = difflib.get_close_matches(name, choices, n=1, cutoff=0.5)
    return f"; did you mean '{match[0]}'?" if match else f"; valid keys: {', '.join(sorted(choices))}"


def _check_section_dict(raw: Any, source: str) -> dict[str, dict[str, Any]]:
    """Validate one file's (or the overrides') mapping; return it with typed values and aliases applied."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: a recipe must be a mapping of sections, got {type(raw).__name__}")
    out: dict[str, dict[str, Any]] = {}
    for section, body in raw.items():
        if section == "base":
            continue
        if section not in SECTIONS:
            raise ConfigError(
                f"{source}: unknown section '{section}'{_closest(str(section), list(SECTIONS))}"
            )
        if body is None:
            continue
        if not isinstance(body, dict):
            raise ConfigError(f"{source}: section '{section}' must be a mapping of keys, got {body!r}")
        fields = _fields(SECTIONS[section])
        typed: dict[str, Any] = {}
        for key, value in body.items():
            key = ALIASES.get(key, key)
            if key not in fields:
                raise ConfigError(
                    f"{source}: unknown key '{section}.{key}'{_closest(str(key), list(fields))}"
                )
            typed[key] = coerce(value, fields[key], f"{source}: {section}.{key}")
        out[section] = typed
    return out


def _resolve_base(name: str, relative_to: Path) -> Path:
    candidates = [relative_to.parent / name, RECIPE_DIR / name]
    if not name.endswith((".yaml", ".yml")):
        candidates += [c.with_name(c.name + ".yaml") for c in candidates]
    for cand in candidates:
        if cand.is_file():
            return cand.resolve()
    raise ConfigError(f"{relative_to}: base recipe '{name}' not found (looked in {relative_to.parent} and {RECIPE_DIR})")


def find_recipe(name: str | Path) -> Path:
    """A recipe path as given, else a name under ``recipes/`` (``wav2vec2_tiny`` or ``wav2vec2_tiny.yaml``)."""
    path = Path(name)
    candidates = [path]
    if not path.is_absolute():  # a name under recipes/, or recipes/NAME from another folder than the repository's
        candidates += [RECIPE_DIR / path, RECIPE_DIR.parent / path]
    if path.suffix not in (".yaml", ".yml"):
        candidates += [c.with_name(c.name + ".yaml") for c in candidates]
    for cand in candidates:
        if cand.is_file():
            return cand
    if path.is_dir():
        raise ConfigError(f"recipe {path} is a folder; give a recipe file (.yaml)")
    names = sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))
    raise ConfigError(f"recipe not found: {path} (a path, or a name under {RECIPE_DIR}: {', '.join(names)})")


def read_recipe(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, dict[str, Any]]:
    """Read a recipe file and its ``base:`` chain; return merged, typed sections."""
    path = find_recipe(path)
    path = path.resolve()
    if path in _seen:
        chain = " -> ".join(str(p) for p in _seen + (path,))
        raise ConfigError(f"recipe base chain loops: {chain}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (a recipe is YAML)") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    merged: dict[str, dict[str, Any]] = {}
    if isinstance(raw, dict) and raw.get("base"):
        base = raw["base"]
        if not isinstance(base, str):
            raise ConfigError(f"{path}: 'base' must be a file name, got {base!r}")
        merged = read_recipe(_resolve_base(base, path), _seen + (path,))
    for section, body in _check_section_dict(raw, str(path)).items():
        merged.setdefault(section, {}).update(body)
    return merged


def parse_overrides(overrides: list[str]) -> dict[str, dict[str, Any]]:
    """``["optimization.lr=1e-4", "common.bf16=true"]`` -> typed nested dict."""
    raw: dict[str, dict[str, Any]] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}': expected section.key=value (e.g. optimization.lr=1e-4)")
        dotted, text = item.split("=", 1)
        parts = dotted.strip().split(".")
        if len(parts) != 2 or not all(parts):
            raise ConfigError(f"override '{item}': expected section.key=value (e.g. optimization.lr=1e-4)")
        try:
            # "(" only appears in Python-literal values such as "[(64,20,10),(128,4,4)]", which YAML
            # would split into strings; parse_literal reads those from the raw text.
            value = text if "(" in text else yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError:
            value = text
        raw.setdefault(parts[0], {})[parts[1]] = value
    return _check_section_dict(raw, "command line")


def build_config(sections: dict[str, dict[str, Any]]) -> Config:
    kwargs = {name: SECTIONS[name](**sections.get(name, {})) for name in SECTIONS}
    return Config(**kwargs)


def load_config(recipe: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Load a recipe (with its ``base:`` chain) and apply ``section.key=value`` overrides."""
    sections = read_recipe(recipe) if recipe is not None else {}
    for section, body in parse_overrides(list(overrides or [])).items():
        sections.setdefault(section, {}).update(body)
    cfg = build_config(sections)
    from speechssl.config_check import check_values

    check_values(cfg)  # ranges: every command refuses the same values, before any work
    return cfg


def missing_keys(cfg: Config) -> list[str]:
    """Dotted names of settings still at the ``???`` marker."""
    out = []
    for section, body in cfg.to_dict().items():
        out += [f"{section}.{k}" for k, v in body.items() if v == MISSING]
    return out


def require_set(cfg: Config) -> None:
    """Raise ConfigError if a ``???`` setting was never given a value."""
    missing = missing_keys(cfg)
    if missing:
        hint = " ".join(f"{k}=..." for k in missing)
        raise ConfigError(f"required setting(s) not set: {', '.join(missing)}; add them on the command line: {hint}")


def _to_plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    return obj


def config_to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=None)


def config_from_dict(data: dict[str, Any], source: str = "checkpoint") -> Config:
    """Rebuild a Config from ``Config.to_dict()`` output (e.g. stored in a checkpoint)."""
    return build_config(_check_section_dict(data, source))


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically."""
    atomic_write_text(path, config_to_yaml(cfg))
