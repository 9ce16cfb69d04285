"""fairseq2 (0.8.1) wav2vec 2.0 checkpoints and asset cards.

Export writes a folder that fairseq2 loads as a ``wav2vec2`` family model::

    model.pt             {"model": state dict in fairseq2's names}  (torch.load weights_only works)
    <name>.yaml          asset card: name, model_family: wav2vec2, model_arch, model_config (every
                         Wav2Vec2Config field that describes the network), checkpoint: model.pt

    FAIRSEQ2_USER_ASSET_DIR=DIR python -c "from fairseq2.models.wav2vec2 import get_wav2vec2_model_hub; \\
        m = get_wav2vec2_model_hub().load_model('<name>')"     # <name>: the card's name (the folder name)

(fairseq2 reads the cards of ``$FAIRSEQ2_USER_ASSET_DIR``; a relative ``checkpoint`` is resolved against
the card's folder). Import reads such a folder (the card gives the architecture, ``model_config`` the
overrides of fairseq2's ``base`` / ``large`` / ``large_lv60k`` presets, reproduced here) or a card file.

fairseq2 wav2vec 2.0 has no HuBERT or CTC in this family (``wav2vec2_asr`` is a separate one), so
those are not exported. Names (``N`` layer index)::

    speechssl                                  fairseq2
    feature_extractor.conv_layers.N.conv       encoder_frontend.feature_extractor.layers.N.conv
    feature_extractor.conv_layers.0.norm (GN)  encoder_frontend.feature_extractor.layers.0.group_norm
    feature_extractor.conv_layers.N.norm (LN)  encoder_frontend.feature_extractor.layers.N.layer_norm
    feature_projection.layer_norm              encoder_frontend.post_extract_layer_norm
    feature_projection.projection              encoder_frontend.model_dim_proj
    encoder.pos_conv.conv.bias / original0 / original1
                                               encoder_frontend.pos_encoder.conv.bias / weight_g / weight_v
    encoder.layer_norm                         encoder_frontend.layer_norm (post-LN) / encoder.layer_norm (pre-LN)
    encoder.layers.N.self_attn.qkv_proj        encoder.layers.N.self_attn.{q,k,v}_proj (split)
    encoder.layers.N.self_attn.out_proj        encoder.layers.N.self_attn.output_proj
    encoder.layers.N.fc1 / fc2                 encoder.layers.N.ffn.inner_proj / output_proj
    encoder.layers.N.final_layer_norm          encoder.layers.N.ffn_layer_norm
    encoder.layers.N.self_attn_layer_norm      (same)
    mask_emb                                   masker.temporal_mask_embed
    quantizer.vars / weight_proj               quantizer.entries / entry_proj   (+ quantizer.num_updates)
    project_q / final_proj                     final_target_proj / final_proj
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Mapping

import torch
import yaml
from torch import Tensor

from speechssl.config import ModelConfig
from speechssl.interop.common import InteropError, Loaded, card_name, export_dir, imported_config

_L = r"encoder\.layers\.(\d+)\."
# speechssl -> fairseq2 (the encoder.layer_norm rule depends on the norm order and is handled apart)
_RULES = [
    (r"feature_extractor\.conv_layers\.(\d+)\.conv\.(weight|bias)",
     r"encoder_frontend.feature_extractor.layers.\1.conv.\2"),
    (r"feature_projection\.layer_norm\.(weight|bias)", r"encoder_frontend.post_extract_layer_norm.\1"),
    (r"feature_projection\.projection\.(weight|bias)", r"encoder_frontend.model_dim_proj.\1"),
    (r"encoder\.pos_conv\.conv\.bias", "encoder_frontend.pos_encoder.conv.bias"),
    (r"encoder\.pos_conv\.conv\.parametrizations\.weight\.original0", "encoder_frontend.pos_encoder.conv.weight_g"),
    (r"encoder\.pos_conv\.conv\.parametrizations\.weight\.original1", "encoder_frontend.pos_encoder.conv.weight_v"),
    (_L + r"self_attn\.out_proj\.(weight|bias)", r"encoder.layers.\1.self_attn.output_proj.\2"),
    (_L + r"self_attn_layer_norm\.(weight|bias)", r"encoder.layers.\1.self_attn_layer_norm.\2"),
    (_L + r"fc1\.(weight|bias)", r"encoder.layers.\1.ffn.inner_proj.\2"),
    (_L + r"fc2\.(weight|bias)", r"encoder.layers.\1.ffn.output_proj.\2"),
    (_L + r"final_layer_norm\.(weight|bias)", r"encoder.layers.\1.ffn_layer_norm.\2"),
    (r"mask_emb", "masker.temporal_mask_embed"),
    (r"quantizer\.vars", "quantizer.entries"),
    (r"quantizer\.weight_proj\.(weight|bias)", r"quantizer.entry_proj.\1"),
    (r"project_q\.(weight|bias)", r"final_target_proj.\1"),
    (r"final_proj\.(weight|bias)", r"final_proj.\1"),
]

# fairseq2 0.8.1's wav2vec2 presets (fairseq2/models/wav2vec2/config.py), as plain dicts
_BASE_ENCODER = dict(
    model_dim=768, max_seq_len=4096, feature_dim=512, use_fbank=False, first_pass_dropout_p=0.0,
    layer_norm_features=True, feature_extractor_layer_descs=[[512, 10, 5]] + [[512, 3, 2]] * 4 + [[512, 2, 2]] * 2,
    feature_extractor_bias=False, feature_extractor_layer_norm_convs=False, feature_grad_scale=0.1,
    num_fbank_channels=0, fbank_stride=0, sample_fbank_every_k=0, pos_encoder_type="conv", pos_encoder_depth=1,
    pos_conv_kernel_size=128, num_pos_conv_groups=16, use_conformer=False, num_encoder_layers=12,
    num_encoder_attn_heads=12, ffn_inner_dim=3072, dropout_p=0.1, attn_dropout_p=0.1, ffn_inner_dropout_p=0.0,
    layer_drop_p=0.05, norm_order="POST", depthwise_conv_kernel_size=0,
)
_BASE = dict(
    encoder_config=_BASE_ENCODER, final_dim=256, final_proj_bias=True, quantizer_encoder_grad=True,
    temporal_mask_span_len=10, max_temporal_mask_prob=0.69, min_num_temporal_mask_spans=2, spatial_mask_span_len=10,
    max_spatial_mask_prob=0.0, min_num_spatial_mask_spans=2, quantized_dim=256, num_codebooks=2,
    num_codebook_entries=320, codebook_sampling_temperature=[2.0, 0.5, 0.999995], num_distractors=100, logit_temp=0.1,
)


def _preset(arch: str) -> dict[str, Any]:
    cfg = copy.deepcopy(_BASE)
    enc = cfg["encoder_config"]
    if arch in ("large", "large_lv60k"):
        enc.update(model_dim=1024, num_encoder_layers=24, num_encoder_attn_heads=16, ffn_inner_dim=4096, dropout_p=0.0,
                   layer_drop_p=0.2)
        cfg.update(quantized_dim=768, final_dim=768)
    if arch == "large_lv60k":
        enc.update(layer_norm_features=False, feature_extractor_bias=True, feature_extractor_layer_norm_convs=True,
                   layer_drop_p=0.0, norm_order="PRE")
        cfg["codebook_sampling_temperature"] = [2.0, 0.1, 0.999995]
    if arch not in ("base", "large", "large_lv60k"):
        raise InteropError(f"fairseq2 wav2vec2 architecture '{arch}' is not known here (base, large, large_lv60k)")
    return cfg


def fairseq2_config(cfg: ModelConfig) -> tuple[str, dict[str, Any]]:
    """``(model_arch, model_config)`` for an asset card describing ``cfg``'s network."""
    problems = []
    if cfg.name != "wav2vec2":
        problems.append(f"model.name={cfg.name} (fairseq2's wav2vec2 family is wav2vec 2.0 only)")
    if not cfg.quantize_targets:
        problems.append("model.quantize_targets=false (fairseq2's wav2vec2 always has a quantizer)")
    if cfg.activation_fn != "gelu":
        problems.append(f"model.activation_fn={cfg.activation_fn} (fairseq2: gelu)")
    C = cfg.conv_feature_layers[-1][0]
    if C == cfg.encoder_embed_dim:
        problems.append("conv channels == encoder_embed_dim (fairseq2 then has no feature projection)")
    if problems:
        raise InteropError("cannot export to fairseq2: " + "; ".join(problems))
    final_dim = cfg.final_dim if cfg.final_dim > 0 else cfg.encoder_embed_dim
    pre = cfg.layer_norm_first
    encoder = dict(
        model_dim=cfg.encoder_embed_dim, feature_dim=C,
        feature_extractor_layer_descs=[list(layer) for layer in cfg.conv_feature_layers],
        feature_extractor_bias=cfg.conv_bias, feature_extractor_layer_norm_convs=cfg.extractor_mode == "layer_norm",
        feature_grad_scale=cfg.feature_grad_mult, first_pass_dropout_p=cfg.dropout_input,
        layer_norm_features=not pre, pos_conv_kernel_size=cfg.conv_pos, num_pos_conv_groups=cfg.conv_pos_groups,
        num_encoder_layers=cfg.encoder_layers, num_encoder_attn_heads=cfg.encoder_attention_heads,
        ffn_inner_dim=cfg.encoder_ffn_embed_dim, dropout_p=cfg.dropout, attn_dropout_p=cfg.attention_dropout,
        ffn_inner_dropout_p=cfg.activation_dropout, layer_drop_p=cfg.encoder_layerdrop,
        norm_order="PRE" if pre else "POST",
    )
    top = dict(
        encoder_config=encoder, final_dim=final_dim,
        temporal_mask_span_len=cfg.mask_length, max_temporal_mask_prob=cfg.mask_prob,
        spatial_mask_span_len=cfg.mask_channel_length, max_spatial_mask_prob=cfg.mask_channel_prob,
        quantized_dim=cfg.latent_dim if cfg.latent_dim > 0 else final_dim, num_codebooks=cfg.latent_groups,
        num_codebook_entries=cfg.latent_vars, codebook_sampling_temperature=list(cfg.latent_temp),
        num_distractors=cfg.num_negatives, logit_temp=cfg.logit_temp,
    )
    return ("large_lv60k" if pre else "base"), top


def to_fairseq2_state_dict(state_dict: Mapping[str, Tensor], cfg: ModelConfig,
                           num_updates: int = 0) -> dict[str, Tensor]:
    """speechssl weights -> fairseq2 names (table in the module docstring), with the quantizer's update count."""
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        m = re.fullmatch(_L + r"self_attn\.qkv_proj\.(weight|bias)", key)
        if m:
            for name, part in zip("qkv", value.chunk(3, dim=0)):
                out[f"encoder.layers.{m.group(1)}.self_attn.{name}_proj.{m.group(2)}"] = part
            continue
        m = re.fullmatch(r"encoder\.layer_norm\.(weight|bias)", key)
        if m:
            where = "encoder" if cfg.layer_norm_first else "encoder_frontend"  # pre-LN: after the layers
            out[f"{where}.layer_norm.{m.group(1)}"] = value
            continue
        m = re.fullmatch(r"feature_extractor\.conv_layers\.(\d+)\.norm\.(weight|bias)", key)
        if m:
            norm = "layer_norm" if cfg.extractor_mode == "layer_norm" else "group_norm"
            out[f"encoder_frontend.feature_extractor.layers.{m.group(1)}.{norm}.{m.group(2)}"] = value
            continue
        for pattern, target in _RULES:
            if re.fullmatch(pattern, key):
                out[re.sub(pattern, target, key)] = value
                break
        else:
            raise InteropError(f"speechssl parameter {key} has no fairseq2 counterpart")
    out["quantizer.num_updates"] = torch.tensor(int(num_updates), dtype=torch.int64)
    return {k: v.detach().contiguous().clone() for k, v in out.items()}


def export_fairseq2(loaded: Loaded, out: str | Path, force: bool = False) -> str:
    """Write model.pt + asset card into ``out``; returns the card's (model) name: the folder's name."""
    if loaded.is_ctc:
        raise InteropError("fairseq2 export covers wav2vec 2.0 pretraining models (fairseq2's wav2vec2 family); "
                           "export CTC models with --to hf or --to torchaudio")
    arch, model_config = fairseq2_config(loaded.cfg.model)
    weights = to_fairseq2_state_dict(loaded.model.state_dict(), loaded.cfg.model, loaded.num_updates)
    name = card_name(out)
    card = {"name": name, "model_family": "wav2vec2", "model_arch": arch, "model_config": model_config,
            "checkpoint": "model.pt"}
    with export_dir(out, force) as tmp:
        torch.save({"model": weights}, tmp / "model.pt")
        (tmp / f"{name}.yaml").write_text(yaml.safe_dump(card, sort_keys=False), encoding="utf-8")
    return name


# --------------------------------------------------------------------------------------------------
# Import
# --------------------------------------------------------------------------------------------------


def _merge(base: dict[str, Any], over: Mapping[str, Any], where: str) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if key not in base:
            raise InteropError(f"{where}: unknown fairseq2 wav2vec2 setting '{key}'")
        out[key] = _merge(base[key], value, where) if isinstance(base[key], dict) and isinstance(value, dict) else value
    return out


def config_from_fairseq2(full: Mapping[str, Any], where: str) -> ModelConfig:
    """A complete fairseq2 Wav2Vec2Config (as a dict) -> ModelConfig."""
    e = full["encoder_config"]
    unsupported = {k: e[k] for k, ok in (("use_fbank", False), ("use_conformer", False), ("pos_encoder_type", "conv"),
                                         ("pos_encoder_depth", 1)) if e[k] != ok}
    pre = str(e["norm_order"]).upper().endswith("PRE") or e["norm_order"] == 1
    if e["layer_norm_features"] == pre:
        unsupported["layer_norm_features"] = e["layer_norm_features"]
    if not full.get("final_proj_bias", True):
        unsupported["final_proj_bias"] = False
    if unsupported:
        raise InteropError(f"{where}: fairseq2 settings speechssl does not have: {unsupported}")
    return ModelConfig(
        name="wav2vec2", extractor_mode="layer_norm" if e["feature_extractor_layer_norm_convs"] else "default",
        conv_feature_layers=[tuple(int(v) for v in layer) for layer in e["feature_extractor_layer_descs"]],
        conv_bias=bool(e["feature_extractor_bias"]), feature_grad_mult=float(e["feature_grad_scale"]),
        encoder_layers=int(e["num_encoder_layers"]), encoder_embed_dim=int(e["model_dim"]),
        encoder_ffn_embed_dim=int(e["ffn_inner_dim"]), encoder_attention_heads=int(e["num_encoder_attn_heads"]),
        layer_norm_first=pre, dropout=float(e["dropout_p"]), attention_dropout=float(e["attn_dropout_p"]),
        activation_dropout=float(e["ffn_inner_dropout_p"]), encoder_layerdrop=float(e["layer_drop_p"]),
        dropout_input=float(e["first_pass_dropout_p"]), dropout_features=0.0, conv_pos=int(e["pos_conv_kernel_size"]),
        conv_pos_groups=int(e["num_pos_conv_groups"]), final_dim=int(full["final_dim"]), quantize_targets=True,
        latent_vars=int(full["num_codebook_entries"]), latent_groups=int(full["num_codebooks"]),
        latent_dim=int(full["quantized_dim"]),
        latent_temp=tuple(float(t) for t in full["codebook_sampling_temperature"]),
        mask_length=int(full["temporal_mask_span_len"]), mask_prob=float(full["max_temporal_mask_prob"]),
        mask_channel_length=int(full["spatial_mask_span_len"]), mask_channel_prob=float(full["max_spatial_mask_prob"]),
        num_negatives=int(full["num_distractors"]), logit_temp=float(full["logit_temp"]),
    )


# fairseq2 -> speechssl for the names without special handling (inverse of _RULES)
_INVERSE = [
    (r"encoder_frontend\.feature_extractor\.layers\.(\d+)\.conv\.(weight|bias)",
     r"feature_extractor.conv_layers.\1.conv.\2"),
    (r"encoder_frontend\.post_extract_layer_norm\.(weight|bias)", r"feature_projection.layer_norm.\1"),
    (r"encoder_frontend\.model_dim_proj\.(weight|bias)", r"feature_projection.projection.\1"),
    (r"encoder_frontend\.pos_encoder\.conv\.bias", "encoder.pos_conv.conv.bias"),
    (r"encoder_frontend\.pos_encoder\.conv\.(?:weight_g|parametrizations\.weight\.original0)",
     "encoder.pos_conv.conv.parametrizations.weight.original0"),
    (r"encoder_frontend\.pos_encoder\.conv\.(?:weight_v|parametrizations\.weight\.original1)",
     "encoder.pos_conv.conv.parametrizations.weight.original1"),
    (_L + r"self_attn\.output_proj\.(weight|bias)", r"encoder.layers.\1.self_attn.out_proj.\2"),
    (_L + r"self_attn_layer_norm\.(weight|bias)", r"encoder.layers.\1.self_attn_layer_norm.\2"),
    (_L + r"ffn\.inner_proj\.(weight|bias)", r"encoder.layers.\1.fc1.\2"),
    (_L + r"ffn\.output_proj\.(weight|bias)", r"encoder.layers.\1.fc2.\2"),
    (_L + r"ffn_layer_norm\.(weight|bias)", r"encoder.layers.\1.final_layer_norm.\2"),
    (r"masker\.temporal_mask_embed", "mask_emb"),
    (r"quantizer\.entries", "quantizer.vars"),
    (r"quantizer\.entry_proj\.(weight|bias)", r"quantizer.weight_proj.\1"),
    (r"final_target_proj\.(weight|bias)", r"project_q.\1"),
    (r"final_proj\.(weight|bias)", r"final_proj.\1"),
]


def from_fairseq2_state_dict(state_dict: Mapping[str, Tensor], where: str) -> dict[str, Tensor]:
    """fairseq2 names -> speechssl names (inverse of :func:`to_fairseq2_state_dict`)."""
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, Tensor]] = {}
    unknown = []
    for key, value in state_dict.items():
        key = key[len("module."):] if key.startswith("module.") else key
        if key == "quantizer.num_updates":
            continue
        if m := re.fullmatch(_L + r"self_attn\.(q|k|v)_proj\.(weight|bias)", key):
            qkv.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = value
        elif m := re.fullmatch(r"(?:encoder_frontend|encoder)\.layer_norm\.(weight|bias)", key):
            out[f"encoder.layer_norm.{m.group(1)}"] = value
        elif m := re.fullmatch(r"encoder_frontend\.feature_extractor\.layers\.(\d+)\.(?:group_norm|layer_norm)\."
                               r"(weight|bias)", key):
            out[f"feature_extractor.conv_layers.{m.group(1)}.norm.{m.group(2)}"] = value
        else:
            for pattern, target in _INVERSE:
                if re.fullmatch(pattern, key):
                    out[re.sub(pattern, target, key)] = value
                    break
            else:
                unknown.append(key)
    if unknown:
        raise InteropError(f"{where}: fairseq2 parameters with no speechssl counterpart: {unknown[:8]}")
    for (layer, kind), parts in sorted(qkv.items()):
        if set(parts) != {"q", "k", "v"}:
            raise InteropError(f"{where}: layer {layer} attention {kind} needs q, k and v, found {sorted(parts)}")
        out[f"encoder.layers.{layer}.self_attn.qkv_proj.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def _read_card(src: Path) -> tuple[dict[str, Any], Path]:
    if src.is_dir():
        cards = sorted(src.glob("*.yaml"))
        if len(cards) != 1:
            raise InteropError(f"{src}: expected one asset card (*.yaml), found {len(cards)}")
        src = cards[0]
    try:
        docs = [d for d in yaml.safe_load_all(src.read_text(encoding="utf-8")) if d]
    except (UnicodeDecodeError, yaml.YAMLError) as exc:
        raise InteropError(f"{src}: not a fairseq2 asset card (YAML): {str(exc).splitlines()[0]}") from None
    if len(docs) != 1 or not isinstance(docs[0], dict):
        raise InteropError(f"{src}: not a fairseq2 asset card (one YAML mapping with name, model_family, model_arch "
                           f"and checkpoint; found {len(docs)} document(s) of {type(docs[0]).__name__ if docs else '-'})")
    return docs[0], src


def import_fairseq2(src: str | Path):
    """A fairseq2 wav2vec2 asset card (file, or a folder holding one) -> ``(state dict, Config, num_updates)``."""
    card, card_path = _read_card(Path(src))
    where = str(card_path)
    if card.get("model_family") != "wav2vec2":
        raise InteropError(f"{where}: model_family {card.get('model_family')!r}; speechssl imports fairseq2 wav2vec2")
    full = _merge(_preset(str(card.get("model_arch", "base"))), card.get("model_config") or {}, where)
    cfg = config_from_fairseq2(full, where)
    ckpt = str(card.get("checkpoint", ""))
    path = Path(ckpt[len("file://"):] if ckpt.startswith("file://") else ckpt)
    path = path if path.is_absolute() else card_path.parent / path
    if not path.is_file():
        raise InteropError(f"{where}: checkpoint {path} not found (only local files are read)")
    raw = torch.load(path, map_location="cpu", weights_only=True)
    weights = raw.get("model", raw) if isinstance(raw, dict) else None
    if not isinstance(weights, dict):
        raise InteropError(f"{path}: expected a state dict (or {{'model': state dict}})")
    num_updates = int(weights["quantizer.num_updates"]) if "quantizer.num_updates" in weights else 0
    if "mask_emb" in weights or "post_extract_proj.weight" in weights:  # fairseq (not fairseq2) names
        from speechssl.interop.fairseq import convert_upstream_state_dict

        state = convert_upstream_state_dict(weights, str(path))
    else:
        state = from_fairseq2_state_dict(weights, str(path))
    return state, imported_config(cfg), num_updates

