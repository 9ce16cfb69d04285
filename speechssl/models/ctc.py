"""CTC model for ASR fine-tuning: a wav2vec 2.0 / HuBERT upstream plus one linear output layer.

The layout is fairseq's ``Wav2VecCtc`` (``w2v_encoder.w2v_model`` / ``w2v_encoder.proj``) flattened one
level: ``w2v_model`` (the upstream, without its pretraining heads) and ``proj`` = ``Linear(D, vocab)``::

    source (B, T) --w2v_model(mask=apply_mask and training, features_only=True)--> x (B, L, D)
        --final_dropout--> proj --> logits (B, L, V)        (V = len(task.vocab), blank = index 0)

The upstream is frozen (run under ``no_grad``) while ``num_updates < freeze_finetune_updates``, as
fairseq; the conv feature extractor is frozen for the whole run (``feature_grad_mult: 0``, and its
parameters get ``requires_grad=False`` so the optimizer never holds them).

A fine-tuned checkpoint is self-contained: its ``config["model"]`` is the upstream's full architecture
(resolved from ``w2v_path`` when the run started) and ``config["task"]["vocab"]`` the output symbols, so
:func:`build_ctc_model` rebuilds it with ``load_upstream=False`` without the pretrained file.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn

from speechssl.config import ConfigError, ModelConfig
from speechssl.models.pretrained import load_pretrained, remove_pretraining_modules

# ModelConfig fields a fine-tuning recipe sets on top of a pretrained upstream's architecture
# (fairseq's Wav2Vec2AsrConfig overrides of w2v_args); every other field comes from the checkpoint.
FINETUNE_FIELDS = (
    "dropout", "attention_dropout", "activation_dropout", "dropout_input", "encoder_layerdrop",
    "feature_grad_mult", "mask_prob", "mask_length", "mask_selection", "mask_other", "require_same_masks",
    "mask_dropout", "mask_channel_prob", "mask_channel_length", "mask_channel_selection", "mask_channel_other",
    "w2v_path", "apply_mask", "final_dropout", "freeze_finetune_updates",
)


class Wav2VecCtc(nn.Module):
    """Upstream ``w2v_model`` + ``proj``; see the module docstring.

    Args:
        w2v_model: a Wav2Vec2Model / HubertModel (pretraining heads may already be removed).
        cfg: its ModelConfig with the fine-tuning fields (``apply_mask``, ``final_dropout``,
            ``freeze_finetune_updates``, ``feature_grad_mult``).
        vocab_size: output symbols including the blank (index 0).
    """

    def __init__(self, w2v_model: nn.Module, cfg: ModelConfig, vocab_size: int):
        super().__init__()
        self.cfg = cfg
        self.w2v_model = remove_pretraining_modules(w2v_model)
        if cfg.feature_grad_mult == 0.0:
            self.w2v_model.feature_extractor.requires_grad_(False)
        self.final_dropout = nn.Dropout(cfg.final_dropout)
        self.proj = nn.Linear(cfg.encoder_embed_dim, vocab_size)
        nn.init.xavier_uniform_(self.proj.weight)  # fairseq's Linear()
        nn.init.zeros_(self.proj.bias)
        self.freeze_finetune_updates = cfg.freeze_finetune_updates
        self.num_updates = 0

    def set_num_updates(self, num_updates: int) -> None:
        self.num_updates = num_updates
        if hasattr(self.w2v_model, "set_num_updates"):
            self.w2v_model.set_num_updates(num_updates)

    @property
    def upstream_frozen(self) -> bool:
        return self.num_updates < self.freeze_finetune_updates

    def forward(self, source: Tensor, padding_mask: Optional[Tensor] = None) -> dict[str, Any]:
        """``source (B, T)``, ``padding_mask (B, T)`` (True = padded) -> dict with ``logits (B, L, V)``,
        ``padding_mask (B, L)`` frame-level or None, and ``lengths (B,)`` valid frames per utterance."""
        frozen = self.upstream_frozen and self.training
        with torch.no_grad() if frozen else contextlib.nullcontext():
            out = self.w2v_model(source, padding_mask, mask=self.cfg.apply_mask and self.training,
                                 features_only=True)
        x = out["x"]
        logits = self.proj(self.final_dropout(x))
        frame_pad = out["padding_mask"]
        B, L = logits.shape[:2]
        if frame_pad is None:
            lengths = torch.full((B,), L, dtype=torch.long, device=logits.device)
        else:
            lengths = (~frame_pad).sum(dim=1)
        return {"logits": logits, "padding_mask": frame_pad, "lengths": lengths}


def resolve_finetune_config(cfg: ModelConfig, task_normalize: Optional[bool] = None) -> ModelConfig:
    """The model config a fine-tuning run trains: with ``w2v_path``, the pretrained checkpoint's
    architecture plus the recipe's :data:`FINETUNE_FIELDS`; without, ``cfg`` itself (from scratch).

    ``task_normalize``: the run's ``task.normalize``, checked against the upstream's (fairseq's rule, see
    :func:`~speechssl.models.pretrained.check_normalize`); None skips the check (no upstream weights used).
    """
    if not cfg.w2v_path:
        return dataclasses.replace(cfg)
    from speechssl.models.pretrained import (check_normalize, is_recipe, read_model_config, read_task_normalize,
                                             recipe_model_config)
    from speechssl.train.checkpoint import load_checkpoint

    path = Path(cfg.w2v_path)
    if is_recipe(path):  # a file, or a recipe's name as everywhere else (find_recipe)
        if not cfg.no_pretrained_weights:
            raise ConfigError(f"model.w2v_path={path} is a recipe: it has an architecture but no weights; add "
                              "model.no_pretrained_weights=true to train that architecture from scratch, or give "
                              "a checkpoint of 'speechssl pretrain'")
        try:
            upstream = recipe_model_config(path)
        except ConfigError as exc:
            raise ConfigError(f"model.w2v_path={path}: {exc}") from None
    else:
        if not path.is_file():
            raise ConfigError(f"model.w2v_path={cfg.w2v_path}: file not found (a checkpoint of 'speechssl pretrain')")
        state = load_checkpoint(path)
        upstream = read_model_config(state, path)
        if task_normalize is not None:
            check_normalize(task_normalize, read_task_normalize(state), f"model.w2v_path={path}")
    return dataclasses.replace(upstream, **{k: getattr(cfg, k) for k in FINETUNE_FIELDS})


def build_ctc_model(cfg: ModelConfig, vocab_size: int, load_upstream: bool = True) -> Wav2VecCtc:
    """A :class:`Wav2VecCtc` for ``cfg`` (already resolved by :func:`resolve_finetune_config`).

    ``load_upstream``: load the pretrained weights from ``cfg.w2v_path`` (training start); False when the
    weights come from a fine-tuned checkpoint (evaluation, export, resume).
    """
    from speechssl.models import build_model

    if load_upstream and cfg.w2v_path:
        upstream, _ = load_pretrained(cfg.w2v_path, {k: getattr(cfg, k) for k in FINETUNE_FIELDS})
    else:
        upstream = build_model(cfg)
    return Wav2VecCtc(upstream, cfg, vocab_size)


def load_ctc_checkpoint(path: str, device: str | torch.device = "cpu") -> tuple[Wav2VecCtc, Any]:
    """``(model in eval mode, Config)`` of a ``speechssl finetune`` CTC checkpoint."""
    from speechssl.config import config_from_dict
    from speechssl.train.checkpoint import load_checkpoint

    state = load_checkpoint(path)
    if not isinstance(state, dict) or not isinstance(state.get("config"), dict):
        raise ConfigError(f"{path}: not a speechssl checkpoint (no stored config)")
    cfg = config_from_dict(state["config"], source=str(path))
    if cfg.task.name != "audio_finetuning" or not cfg.task.vocab:
        raise ConfigError(f"{path}: not a CTC fine-tuning checkpoint (task.name={cfg.task.name}); "
                          "make one with 'speechssl finetune recipes/ctc_*.yaml'")
    model = build_ctc_model(cfg.model, len(cfg.task.vocab), load_upstream=False)
    model.load_state_dict(state["model"])
    model.to(device).eval()
    model.set_num_updates(int(state.get("num_updates", 0)))
    return model, cfg
