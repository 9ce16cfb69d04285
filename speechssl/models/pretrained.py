"""Loading a pretrained upstream (wav2vec 2.0, HuBERT or data2vec 2.0) from a speechssl checkpoint.

``load_pretrained(path, overrides)`` reads any checkpoint ``speechssl pretrain`` or ``speechssl finetune``
wrote (``weights_only``), rebuilds the upstream from the checkpoint's own ``config["model"]`` section
(so no recipe is needed), applies ``overrides`` (fine-tuning settings such as ``dropout``,
``mask_prob``, ``encoder_layerdrop``, ``feature_grad_mult``) and loads the weights::

    model, model_cfg = load_pretrained("runs/base/checkpoint_best.pt", {"encoder_layerdrop": 0.1})
    out = model(source, padding_mask, mask=False, features_only=True)
    out["x"]              # (B, L, D) encoder output
    out["layer_results"]  # per-layer (B, L, D) outputs

For a fine-tuned checkpoint (CTC or speaker ID) the upstream inside it (``w2v_model.*`` weights) is
returned, without the task head and without the pretraining-only modules (quantizer, projections, data2vec
2.0's decoder and teacher: its upstream is the student).
Checkpoints from other toolkits (fairseq, Hugging Face) are converted first with ``speechssl import``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional

from torch import nn

from speechssl.config import ConfigError, ModelConfig, config_from_dict

# Modules used only by the pretraining objectives (fairseq's remove_pretraining_modules()); data2vec 2.0's
# decoder and EMA teacher among them.
PRETRAINING_MODULES = ("quantizer", "project_q", "final_proj", "label_embs_concat", "target_glu", "decoder", "teacher")
# Prefix of the upstream's weights inside a fine-tuned checkpoint (fairseq: w2v_encoder.w2v_model).
UPSTREAM_PREFIX = "w2v_model."


def remove_pretraining_modules(model: nn.Module) -> nn.Module:
    """Drop the pretraining heads (quantizer, ``project_q``, ``final_proj``, label embeddings, data2vec 2.0's
    decoder and teacher) in place.

    ``model(..., features_only=True)`` does not use them; fine-tuned checkpoints do not store them.
    """
    for name in PRETRAINING_MODULES:
        if name in model._modules or name in model._parameters:
            setattr(model, name, None)
    return model


def padding_changes_outputs(cfg: ModelConfig) -> bool:
    """Whether padding an utterance in a batch changes its outputs: a group-norm front-end (BASE) normalises
    each channel over the padding too, data2vec's stacked positional convolutions see the padded frames
    (:mod:`speechssl.models.data2vec2`). Evaluation scores such upstreams one utterance at a time."""
    return cfg.extractor_mode in ("default", "group_norm") or (cfg.name == "data2vec2" and cfg.conv_pos_depth > 1)


def _not_speechssl(path: Path, why: str) -> ConfigError:
    return ConfigError(
        f"{path} is not a speechssl checkpoint ({why}). A fairseq or Hugging Face checkpoint must be converted "
        f"first: 'speechssl import {path} --from fairseq|hf|torchaudio|fairseq2 --out OUT.pt', then pass OUT.pt")


def read_model_config(state: dict[str, Any], path: Path) -> ModelConfig:
    """The ``model`` section of a checkpoint's stored config, as a :class:`ModelConfig`."""
    if not isinstance(state, dict) or "model" not in state or not isinstance(state.get("config"), dict):
        keys = ", ".join(sorted(map(str, state))[:8]) if isinstance(state, dict) else type(state).__name__
        raise _not_speechssl(path, f"no 'model' weights and 'config' dict; found: {keys}")
    try:
        return config_from_dict(state["config"], source=str(path)).model
    except ConfigError as exc:
        raise ConfigError(f"{path}: its stored config does not load with this speechssl version ({exc})") from None


def is_recipe(path: str | Path) -> bool:
    """Whether ``path`` names a recipe (``.yaml`` / ``.yml``) rather than a checkpoint."""
    return Path(path).suffix.lower() in (".yaml", ".yml")


def recipe_model_config(path: str | Path) -> ModelConfig:
    """The ``model`` section of a pretraining recipe (with its ``base:`` chain): the architecture a checkpoint
    of that recipe has, for the from-scratch and random-init baselines before (or without) pretraining it.
    HuBERT's ``num_classes`` come from its labels, so a HuBERT recipe's model has no label embeddings; the
    encoder, which is all a baseline uses, is the same."""
    from speechssl.config import load_config

    return load_config(path).model


def read_task_normalize(state: dict[str, Any]) -> bool:
    """The ``task.normalize`` a checkpoint's model was trained with (False when its config has none)."""
    task = state.get("config", {}).get("task") or {}
    return bool(task.get("normalize", False))


def check_normalize(task_normalize: bool, upstream_normalize: bool, upstream: str | Path) -> None:
    """Fine-tuning must normalise its input as the upstream's pretraining did; fairseq's Wav2VecEncoder /
    HubertEncoder assert the same. A mismatch is a ConfigError naming both values and the fix."""
    if task_normalize != upstream_normalize:
        want = str(upstream_normalize).lower()
        raise ConfigError(
            f"task.normalize={str(task_normalize).lower()}, but the upstream {upstream} was pretrained with "
            f"task.normalize={want}: its input must be normalised as in pretraining (fairseq refuses this too); "
            f"set task.normalize={want} (e.g. on the command line)")


def apply_overrides(cfg: ModelConfig, overrides: Optional[dict[str, Any]], source: str = "overrides") -> ModelConfig:
    """A copy of ``cfg`` with ``overrides`` (ModelConfig field -> value) applied; unknown fields are an error."""
    if not overrides:
        return dataclasses.replace(cfg)
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ConfigError(f"{source}: unknown model setting(s) {', '.join(unknown)}; valid: {', '.join(sorted(fields))}")
    return dataclasses.replace(cfg, **overrides)


def upstream_state_dict(state: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """``(upstream weights, from_finetuned)``: a fine-tuned checkpoint's ``w2v_model.*`` weights with the
    prefix removed, or a pretraining checkpoint's weights as they are."""
    weights = state["model"]
    inner = {k[len(UPSTREAM_PREFIX):]: v for k, v in weights.items() if k.startswith(UPSTREAM_PREFIX)}
    if inner:
        return inner, True
    return dict(weights), False


def load_pretrained(path: str | Path, overrides: Optional[dict[str, Any]] = None) -> tuple[nn.Module, ModelConfig]:
    """Rebuild and load the upstream model stored in a speechssl checkpoint.

    Args:
        path: ``checkpoint_*.pt`` of ``speechssl pretrain`` (wav2vec 2.0 / HuBERT) or of ``speechssl
            finetune`` (its upstream is returned).
        overrides: ModelConfig field -> value applied before building (e.g. ``{"dropout": 0.0,
            "mask_prob": 0.65, "encoder_layerdrop": 0.1, "feature_grad_mult": 0.0}``).

    Returns ``(model, model_cfg)``: the model on the CPU in train mode, and the config it was built from
    (the checkpoint's architecture with ``overrides`` applied).
    """
    from speechssl.models import build_model
    from speechssl.train.checkpoint import load_checkpoint

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"pretrained checkpoint not found: {path}")
    try:
        state = load_checkpoint(path)
    except RuntimeError as exc:  # CheckpointError: says what the file is and how to convert it
        raise ConfigError(str(exc)) from None
    cfg = apply_overrides(read_model_config(state, path), overrides, f"overrides for {path}")
    weights, from_finetuned = upstream_state_dict(state)
    model = build_model(cfg)
    if from_finetuned:
        remove_pretraining_modules(model)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ConfigError(
            f"{path}: its weights do not match the model its config describes (model.name={cfg.name}); "
            f"missing: {', '.join(missing[:5]) or '-'}; unexpected: {', '.join(unexpected[:5]) or '-'}")
    return model, cfg
