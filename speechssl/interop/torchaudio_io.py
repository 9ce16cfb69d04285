"""torchaudio folders: ``model.pt`` (a ``torchaudio.models.Wav2Vec2Model`` state dict) + ``config.json``.

torchaudio's ``Wav2Vec2Model`` is the encoder of wav2vec 2.0 and HuBERT alike (no mask embedding,
quantizer or pretraining projections); a CTC model's output layer is its ``aux`` Linear. The folder::

    config.json  {"format": "torchaudio.models.wav2vec2_model", "kwargs": {...}, "model_name": "wav2vec2"|"hubert",
                  "labels": [...CTC symbols, CTC models only], "sample_rate": 16000, "normalize": false}
    model.pt     state dict, torch.load(..., weights_only=True)

loads with::

    meta = json.load(open("DIR/config.json"))
    model = torchaudio.models.wav2vec2_model(**meta["kwargs"])
    model.load_state_dict(torch.load("DIR/model.pt", weights_only=True))

Import reads the same folder (pretraining heads the encoder lacks keep their fresh initialisation).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from speechssl.config import ModelConfig
from speechssl.interop.common import InteropError, Loaded, export_dir, imported_config
from speechssl.interop.names import upstream_to_reference
from speechssl.models.weights import convert_reference_state_dict, torchaudio_model_kwargs

FORMAT = "torchaudio.models.wav2vec2_model"


def torchaudio_export(loaded: Loaded) -> tuple[dict[str, Any], dict[str, Tensor], list[str]]:
    """``(config.json content, state dict, unmapped speechssl keys)`` for ``loaded``."""
    cfg = loaded.cfg.model
    if cfg.name == "data2vec2":
        raise InteropError("torchaudio's wav2vec2_model has no data2vec encoder (positional convolution stack, "
                           "ALiBi); export data2vec models without ALiBi --to hf (transformers' Data2VecAudioModel)")
    if cfg.activation_fn != "gelu":
        raise InteropError(f"torchaudio's encoder has GELU only; the model uses {cfg.activation_fn}")
    kwargs = torchaudio_model_kwargs(cfg)
    weights, unmapped = upstream_to_reference(loaded.upstream.state_dict(), "torchaudio")
    meta: dict[str, Any] = {"format": FORMAT, "model_name": cfg.name, "sample_rate": loaded.cfg.task.sample_rate,
                            "normalize": loaded.cfg.task.normalize}
    if loaded.is_ctc:
        kwargs["aux_num_out"] = len(loaded.vocab)
        weights["aux.weight"], weights["aux.bias"] = loaded.model.proj.weight, loaded.model.proj.bias
        meta["labels"] = loaded.vocab  # blank first
        if loaded.cfg.task.vocab_specials:  # a vocabulary imported from transformers, in its tokenizer's layout
            meta["vocab_specials"] = list(loaded.cfg.task.vocab_specials)
            meta["vocab_blank_id"] = loaded.cfg.task.vocab_blank_id
    meta["kwargs"] = kwargs
    return meta, {k: v.detach().contiguous().clone() for k, v in weights.items()}, unmapped


def export_torchaudio(loaded: Loaded, out: str | Path, force: bool = False) -> list[str]:
    meta, weights, unmapped = torchaudio_export(loaded)
    with export_dir(out, force) as tmp:
        torch.save(weights, tmp / "model.pt")
        (tmp / "config.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return unmapped


def config_from_torchaudio(kwargs: dict[str, Any], name: str) -> ModelConfig:
    """``torchaudio.models.wav2vec2_model`` keyword arguments -> ModelConfig (inverse of
    :func:`speechssl.models.weights.torchaudio_model_kwargs`)."""
    base = ModelConfig(name=name)
    return dataclasses.replace(
        base,
        extractor_mode="default" if kwargs["extractor_mode"] == "group_norm" else "layer_norm",
        conv_feature_layers=[tuple(int(v) for v in layer) for layer in
                             (kwargs.get("extractor_conv_layer_config") or base.conv_feature_layers)],
        conv_bias=bool(kwargs["extractor_conv_bias"]), encoder_embed_dim=int(kwargs["encoder_embed_dim"]),
        dropout_input=float(kwargs["encoder_projection_dropout"]), conv_pos=int(kwargs["encoder_pos_conv_kernel"]),
        conv_pos_groups=int(kwargs["encoder_pos_conv_groups"]), encoder_layers=int(kwargs["encoder_num_layers"]),
        encoder_attention_heads=int(kwargs["encoder_num_heads"]),
        attention_dropout=float(kwargs["encoder_attention_dropout"]),
        encoder_ffn_embed_dim=int(kwargs["encoder_ff_interm_features"]),
        activation_dropout=float(kwargs["encoder_ff_interm_dropout"]), dropout=float(kwargs["encoder_dropout"]),
        layer_norm_first=bool(kwargs["encoder_layer_norm_first"]),
        encoder_layerdrop=float(kwargs["encoder_layer_drop"]),
        quantize_targets=name == "wav2vec2", feature_grad_mult=1.0,
        # torchaudio's frame padding rule (conv output length), also for HuBERT (fairseq's HuBERT: all_samples)
        frame_padding="auto" if name == "wav2vec2" else "conv_length",
    )


def import_torchaudio(folder: str | Path):
    """A torchaudio folder (see the module docstring) -> ``(state dict, Config, notes)``."""
    from speechssl.models import build_model

    folder = Path(folder)
    meta_path, weights_path = folder / "config.json", folder / "model.pt"
    if not meta_path.is_file() or not weights_path.is_file():
        raise InteropError(f"{folder}: expected config.json and model.pt (the layout 'speechssl export --to "
                           "torchaudio' writes; see speechssl/interop/torchaudio_io.py)")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InteropError(f"{meta_path}: not a torchaudio export's config (JSON): {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("kwargs"), dict):
        raise InteropError(f"{meta_path}: not a torchaudio export (format {meta.get('format')!r})")
    name = meta.get("model_name", "wav2vec2")
    if name not in ("wav2vec2", "hubert"):
        raise InteropError(f"{meta_path}: model_name must be wav2vec2 or hubert, got {name!r}")
    try:
        model_cfg = config_from_torchaudio(meta["kwargs"], name)
    except KeyError as exc:
        raise InteropError(f"{meta_path}: kwargs lack {exc}") from None
    weights = torch.load(weights_path, map_location="cpu", weights_only=True)
    aux = {k: weights.pop(k) for k in ("aux.weight", "aux.bias") if k in weights}
    try:
        state = convert_reference_state_dict(weights)
    except ValueError as exc:
        raise InteropError(f"{weights_path}: {exc}") from None
    fresh = build_model(model_cfg).state_dict()
    notes = sorted(k for k in fresh if k not in state)
    state = {**{k: fresh[k] for k in notes}, **state}
    vocab = meta.get("labels")
    if aux:
        if not vocab or len(vocab) != aux["aux.weight"].shape[0]:
            raise InteropError(f"{meta_path}: the CTC layer has {aux['aux.weight'].shape[0]} outputs; 'labels' must "
                               "list that many symbols")
        drop = ("quantizer.", "project_q.", "final_proj.", "label_embs_concat")
        state = {f"w2v_model.{k}": v for k, v in state.items() if not k.startswith(drop)}
        state["proj.weight"], state["proj.bias"] = aux["aux.weight"], aux["aux.bias"]
        notes = [n for n in notes if not n.startswith(drop)]
        model_cfg = dataclasses.replace(model_cfg, quantize_targets=False)
    config = imported_config(model_cfg, sample_rate=int(meta.get("sample_rate", 16000)),
                             normalize=bool(meta.get("normalize", False)), vocab=vocab if aux else None,
                             vocab_specials=meta.get("vocab_specials") or [],
                             vocab_blank_id=int(meta.get("vocab_blank_id", 0)))
    return state, config, notes
