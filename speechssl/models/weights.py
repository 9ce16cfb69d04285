"""Weight and config mapping between speechssl's wav2vec 2.0 / HuBERT and torchaudio / transformers / fairseq.

Parameter names (``N`` = layer index). torchaudio (TA) and transformers (HF) use the same names except
for prefixes: TA's encoder sits under ``encoder.transformer.`` (its feature projection under
``encoder.``), HF's model under ``wav2vec2.``. fairseq (FS) names are given for reference::

    speechssl                                   TA / HF                                       FS
    feature_extractor.conv_layers.N.conv        feature_extractor.conv_layers.N.conv          ...conv_layers.N.0
    feature_extractor.conv_layers.N.norm        feature_extractor.conv_layers.N.layer_norm    ...N.2 (GN) / N.2.1 (LN)
    feature_projection.layer_norm               feature_projection.layer_norm                 layer_norm
    feature_projection.projection (C != D)      feature_projection.projection (always)        post_extract_proj (C != D)
    mask_emb                                    masked_spec_embed (HF)                        mask_emb
    encoder.pos_conv.conv.bias                  encoder.pos_conv_embed.conv.bias              encoder.pos_conv.0.bias
    encoder.pos_conv.conv.parametrizations.weight.original0 / .original1  (weight-norm g / v): TA / HF
        ...pos_conv_embed.conv.parametrizations.weight.original0 / 1 (older HF: weight_g / weight_v),
        FS encoder.pos_conv.0.weight_g / weight_v
    encoder.layer_norm                          encoder.layer_norm                            encoder.layer_norm
    encoder.layers.N.self_attn.qkv_proj         cat(attention.q_proj, k_proj, v_proj), dim 0  cat(self_attn.q/k/v_proj)
    encoder.layers.N.self_attn.out_proj         encoder.layers.N.attention.out_proj           ...self_attn.out_proj
    encoder.layers.N.self_attn_layer_norm       encoder.layers.N.layer_norm                   (same as speechssl)
    encoder.layers.N.fc1 / fc2                  ...feed_forward.intermediate_dense / output_dense   (same as speechssl)
    encoder.layers.N.final_layer_norm           encoder.layers.N.final_layer_norm             (same as speechssl)
    quantizer.vars (1, G*V, d)                  quantizer.codevectors (HF)                    quantizer.vars
    quantizer.weight_proj                       quantizer.weight_proj (HF)                    quantizer.weight_proj
    project_q                                   project_q (HF)                                project_q
    final_proj                                  project_hid (HF)                              final_proj

torchaudio's ``Wav2Vec2Model`` is an encoder only (no mask embedding, quantizer or projections); its
optional CTC head ``aux`` has no counterpart here and is reported as unmapped.

HuBERT (:class:`~speechssl.models.hubert.HubertModel`) shares every name above except the quantizer.
transformers' ``HubertModel`` uses the wav2vec 2.0 names (prefix ``hubert.`` inside ``HubertForCTC``);
it has no pretraining head. torchaudio's ``HuBERTPretrainModel`` nests the encoder under ``wav2vec2.``
and adds::

    speechssl                  TA HuBERTPretrainModel               FS HubertModel
    mask_emb                   mask_generator.mask_embedding        mask_emb
    final_proj                 logit_generator.final_proj           final_proj
    label_embs_concat (K, F)   logit_generator.label_embeddings     label_embs_concat (4 + K, F) per set

fairseq's label embeddings have one row per entry of its ``Dictionary`` of ``dict.km.txt``, which
starts with the four specials ``<s> <pad> </s> <unk>``: its rows ``4 .. 4+K-1`` (per label set) are
speechssl's rows ``0 .. K-1``, and speechssl's softmax runs over the K clusters only (fairseq's over all
``4 + K`` rows, the specials never being targets). ``speechssl import --from fairseq`` drops the four rows,
:func:`speechssl.interop.fairseq.fairseq_state_dict` writes four zero rows back. torchaudio has one label
set of K rows (no specials) and a single (tied) ``final_proj``.

Feature projection: fairseq (and speechssl) build ``post_extract_proj`` only when the last conv layer's
channels differ from ``encoder_embed_dim``; torchaudio and transformers always have the Linear. Export to
them writes an identity when speechssl has none; import drops an identity and refuses a learned square one.

Frame padding (``model.frame_padding``): a sample-level padding mask becomes a frame-level one by the conv
output length of the valid samples in fairseq's wav2vec 2.0, torchaudio and transformers (wav2vec 2.0 and
HuBERT alike), and by fairseq's ``HubertModel.forward_padding_mask`` in fairseq's HuBERT (a frame is padded
only if all of its ``T // L`` samples are: usually one more valid frame per padded utterance, e.g. 50
instead of 49 for 16,000 of 32,000 samples). speechssl follows fairseq per model (``auto``); imports from
transformers and torchaudio set ``conv_length`` for HuBERT, so that they compute what the source did, and
a HuBERT exported to them gets their rule (outputs differ only for padded utterances of a batch).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

import torch
from torch import Tensor

from speechssl.config import ModelConfig

_LAYER = r"encoder\.(?:transformer\.)?layers\.(\d+)\."
_RULES: list[tuple[str, str]] = [
    (r"feature_extractor\.conv_layers\.(\d+)\.conv\.(weight|bias)", r"feature_extractor.conv_layers.\1.conv.\2"),
    (r"feature_extractor\.conv_layers\.(\d+)\.layer_norm\.(weight|bias)", r"feature_extractor.conv_layers.\1.norm.\2"),
    (r"(?:encoder\.)?feature_projection\.(layer_norm|projection)\.(weight|bias)", r"feature_projection.\1.\2"),
    (r"masked_spec_embed", "mask_emb"),
    (r"encoder\.(?:transformer\.)?pos_conv_embed\.conv\.bias", "encoder.pos_conv.conv.bias"),
    (r"encoder\.(?:transformer\.)?pos_conv_embed\.conv\.(?:parametrizations\.weight\.original0|weight_g)",
     "encoder.pos_conv.conv.parametrizations.weight.original0"),
    (r"encoder\.(?:transformer\.)?pos_conv_embed\.conv\.(?:parametrizations\.weight\.original1|weight_v)",
     "encoder.pos_conv.conv.parametrizations.weight.original1"),
    (r"encoder\.(?:transformer\.)?layer_norm\.(weight|bias)", r"encoder.layer_norm.\1"),
    # transformers' data2vec audio: its stack of positional convolutions
    (r"encoder\.pos_conv_embed\.layers\.(\d+)\.conv\.(weight|bias)", r"encoder.pos_conv.layers.\1.conv.\2"),
    (_LAYER + r"attention\.out_proj\.(weight|bias)", r"encoder.layers.\1.self_attn.out_proj.\2"),
    (_LAYER + r"layer_norm\.(weight|bias)", r"encoder.layers.\1.self_attn_layer_norm.\2"),
    (_LAYER + r"feed_forward\.intermediate_dense\.(weight|bias)", r"encoder.layers.\1.fc1.\2"),
    (_LAYER + r"feed_forward\.output_dense\.(weight|bias)", r"encoder.layers.\1.fc2.\2"),
    (_LAYER + r"final_layer_norm\.(weight|bias)", r"encoder.layers.\1.final_layer_norm.\2"),
    (r"quantizer\.codevectors", "quantizer.vars"),
    (r"quantizer\.weight_proj\.(weight|bias)", r"quantizer.weight_proj.\1"),
    (r"project_q\.(weight|bias)", r"project_q.\1"),
    (r"project_hid\.(weight|bias)", r"final_proj.\1"),
    # torchaudio HuBERTPretrainModel
    (r"mask_generator\.mask_embedding", "mask_emb"),
    (r"logit_generator\.label_embeddings", "label_embs_concat"),
    (r"logit_generator\.final_proj\.(weight|bias)", r"final_proj.\1"),
]
_PREFIXES = ("wav2vec2.", "hubert.", "data2vec_audio.")
_QKV = re.compile(_LAYER + r"attention\.(q|k|v)_proj\.(weight|bias)")


def convert_reference_state_dict(state_dict: Mapping[str, Tensor], strict: bool = True,
                                 keep_projection: bool = False) -> dict[str, Tensor]:
    """A torchaudio ``Wav2Vec2Model`` / ``HuBERTPretrainModel`` or transformers ``Wav2Vec2Model`` /
    ``Wav2Vec2ForPreTraining`` / ``HubertModel`` / ``Data2VecAudioModel`` state dict -> speechssl parameter
    names (tables in the module docstring; data2vec: :mod:`speechssl.interop.data2vec`).
    ``keep_projection``: keep a square feature projection (data2vec, which always has one).

    Separate q/k/v projections are fused into ``qkv_proj``. Keys that have no counterpart raise
    ValueError listing them; with ``strict=False`` they are dropped. Load the result with
    ``model.load_state_dict(sd, strict=False)`` when the source lacks parts (torchaudio has no quantizer).
    """
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, Tensor]] = {}
    unmapped = []
    for key, value in state_dict.items():
        name = next((key[len(p):] for p in _PREFIXES if key.startswith(p)), key)
        m = _QKV.fullmatch(name)
        if m:
            qkv.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = value
            continue
        for pattern, target in _RULES:
            if re.fullmatch(pattern, name):
                out[re.sub(pattern, target, name)] = value
                break
        else:
            unmapped.append(key)
    for (layer, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise ValueError(f"layer {layer}: attention {kind} needs q, k and v projections, found {sorted(parts)}")
        out[f"encoder.layers.{layer}.self_attn.qkv_proj.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    if unmapped and strict:
        raise ValueError(f"{len(unmapped)} parameters have no speechssl counterpart: {unmapped[:8]}"
                         f"{' ...' if len(unmapped) > 8 else ''} (pass strict=False to drop them)")
    if not keep_projection:
        _drop_identity_projection(out)
    return out


def _drop_identity_projection(out: dict[str, Tensor]) -> None:
    """A square feature projection (conv channels == encoder width): speechssl, as fairseq, has none.
    torchaudio / transformers always have one, and an identity (what speechssl exports) is dropped; a
    learned one cannot be represented and is an error."""
    w, b = out.get("feature_projection.projection.weight"), out.get("feature_projection.projection.bias")
    if w is None or w.shape[0] != w.shape[1]:
        return
    if not torch.equal(w, torch.eye(w.shape[0], dtype=w.dtype)) or (b is not None and bool(b.any())):
        raise ValueError(f"feature_projection.projection is a learned {w.shape[0]}x{w.shape[1]} Linear; speechssl "
                         "(like fairseq) has no feature projection when the conv channels equal the encoder width, "
                         "so this model cannot be converted")
    out.pop("feature_projection.projection.weight")
    out.pop("feature_projection.projection.bias", None)


def _get(cfg: Any, key: str) -> Any:
    return cfg[key] if isinstance(cfg, Mapping) else getattr(cfg, key)


def config_from_transformers(hf_config: Any) -> ModelConfig:
    """A transformers ``Wav2Vec2Config`` (object or ``to_dict()``) -> :class:`ModelConfig`.

    transformers has no ``feature_grad_mult`` (its gradient into the extractor is unscaled: 1.0 here)
    and no temperature schedule in the config (speechssl's default schedule is kept).
    """
    c = lambda key: _get(hf_config, key)  # noqa: E731
    return ModelConfig(
        name="wav2vec2", **_encoder_fields_from_transformers(hf_config),
        dropout_features=c("feat_quantizer_dropout"),
        final_dim=c("proj_codevector_dim"), quantize_targets=True, latent_vars=c("num_codevectors_per_group"),
        latent_groups=c("num_codevector_groups"), latent_dim=c("codevector_dim"),
        num_negatives=c("num_negatives"), logit_temp=c("contrastive_logits_temperature"),
    )


def _encoder_fields_from_transformers(hf_config: Any) -> dict[str, Any]:
    """The :class:`ModelConfig` fields ``Wav2Vec2Config`` and ``HubertConfig`` both describe (extractor,
    encoder, masking); inverse of :func:`_transformers_encoder_kwargs`."""
    c = lambda key: _get(hf_config, key)  # noqa: E731
    return dict(
        extractor_mode="default" if c("feat_extract_norm") == "group" else "layer_norm",
        conv_feature_layers=[tuple(v) for v in zip(c("conv_dim"), c("conv_kernel"), c("conv_stride"))],
        conv_bias=bool(c("conv_bias")), feature_grad_mult=1.0,
        encoder_layers=c("num_hidden_layers"), encoder_embed_dim=c("hidden_size"),
        encoder_ffn_embed_dim=c("intermediate_size"), encoder_attention_heads=c("num_attention_heads"),
        activation_fn=c("hidden_act"), layer_norm_first=bool(c("do_stable_layer_norm")),
        dropout=c("hidden_dropout"), attention_dropout=c("attention_dropout"),
        activation_dropout=c("activation_dropout"), encoder_layerdrop=c("layerdrop"),
        dropout_input=c("feat_proj_dropout"),
        conv_pos=c("num_conv_pos_embeddings"), conv_pos_groups=c("num_conv_pos_embedding_groups"),
        mask_prob=c("mask_time_prob"), mask_length=c("mask_time_length"),
        mask_channel_prob=c("mask_feature_prob"), mask_channel_length=c("mask_feature_length"),
    )


def _transformers_encoder_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    """The ``Wav2Vec2Config`` / ``HubertConfig`` keyword arguments both share: extractor, encoder, masking."""
    layers = cfg.conv_feature_layers
    return dict(
        feat_extract_norm="group" if cfg.extractor_mode in ("default", "group_norm") else "layer",
        conv_dim=[c for c, _, _ in layers], conv_kernel=[k for _, k, _ in layers],
        conv_stride=[s for _, _, s in layers], conv_bias=cfg.conv_bias, feat_extract_activation="gelu",
        num_hidden_layers=cfg.encoder_layers, hidden_size=cfg.encoder_embed_dim,
        intermediate_size=cfg.encoder_ffn_embed_dim, num_attention_heads=cfg.encoder_attention_heads,
        hidden_act=cfg.activation_fn, do_stable_layer_norm=cfg.layer_norm_first,
        hidden_dropout=cfg.dropout, attention_dropout=cfg.attention_dropout,
        activation_dropout=cfg.activation_dropout, layerdrop=cfg.encoder_layerdrop,
        feat_proj_dropout=cfg.dropout_input,
        num_conv_pos_embeddings=cfg.conv_pos, num_conv_pos_embedding_groups=cfg.conv_pos_groups,
        mask_time_prob=cfg.mask_prob, mask_time_length=cfg.mask_length, mask_time_min_masks=2,
        mask_feature_prob=cfg.mask_channel_prob, mask_feature_length=cfg.mask_channel_length,
        layer_norm_eps=1e-5,
    )


def transformers_config_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    """Keyword arguments for transformers' ``Wav2Vec2Config`` describing the same network as ``cfg``."""
    final_dim = cfg.final_dim if cfg.final_dim > 0 else cfg.encoder_embed_dim
    return dict(
        _transformers_encoder_kwargs(cfg),
        feat_quantizer_dropout=cfg.dropout_features,
        proj_codevector_dim=final_dim, num_codevectors_per_group=cfg.latent_vars,
        num_codevector_groups=cfg.latent_groups, codevector_dim=cfg.latent_dim if cfg.latent_dim > 0 else final_dim,
        num_negatives=cfg.num_negatives, contrastive_logits_temperature=cfg.logit_temp,
    )


def torchaudio_model_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    """Keyword arguments for ``torchaudio.models.wav2vec2_model`` describing ``cfg``'s encoder."""
    return dict(
        extractor_mode="group_norm" if cfg.extractor_mode in ("default", "group_norm") else "layer_norm",
        extractor_conv_layer_config=[tuple(layer) for layer in cfg.conv_feature_layers],
        extractor_conv_bias=cfg.conv_bias, encoder_embed_dim=cfg.encoder_embed_dim,
        encoder_projection_dropout=cfg.dropout_input, encoder_pos_conv_kernel=cfg.conv_pos,
        encoder_pos_conv_groups=cfg.conv_pos_groups, encoder_num_layers=cfg.encoder_layers,
        encoder_num_heads=cfg.encoder_attention_heads, encoder_attention_dropout=cfg.attention_dropout,
        encoder_ff_interm_features=cfg.encoder_ffn_embed_dim, encoder_ff_interm_dropout=cfg.activation_dropout,
        encoder_dropout=cfg.dropout, encoder_layer_norm_first=cfg.layer_norm_first,
        encoder_layer_drop=cfg.encoder_layerdrop, aux_num_out=None,
    )


# --------------------------------------------------------------------------------------------------
# HuBERT
# --------------------------------------------------------------------------------------------------


def hubert_config_from_transformers(hf_config: Any, num_classes: list[int] | None = None,
                                    label_rate: float = -1.0) -> ModelConfig:
    """A transformers ``HubertConfig`` (object or ``to_dict()``) -> :class:`ModelConfig` (``name: hubert``).

    transformers' HuBERT has no pretraining head: ``num_classes`` / ``label_rate`` (and ``final_dim`` 256,
    untied projection, as HuBERT BASE) describe the head to add, if any; its gradient into the
    extractor is unscaled (``feature_grad_mult`` 1.0); its frame padding is the conv-length rule
    (``frame_padding: conv_length``; fairseq's HuBERT, speechssl's default, uses ``all_samples``).
    """
    from speechssl.models.hubert import hubert_base_config

    c = lambda key: _get(hf_config, key)  # noqa: E731
    if c("conv_pos_batch_norm") if _has(hf_config, "conv_pos_batch_norm") else False:
        raise ValueError("HubertConfig.conv_pos_batch_norm=True (a batch-normed positional convolution) has no "
                         "speechssl counterpart")
    if not (c("feat_proj_layer_norm") if _has(hf_config, "feat_proj_layer_norm") else True):
        raise ValueError("HubertConfig.feat_proj_layer_norm=False (no LayerNorm before the feature projection) has "
                         "no speechssl counterpart")
    return dataclasses.replace(hubert_base_config(num_classes or [], label_rate),
                               **_encoder_fields_from_transformers(hf_config), frame_padding="conv_length")


def _has(cfg: Any, key: str) -> bool:
    return key in cfg if isinstance(cfg, Mapping) else hasattr(cfg, key)


def hubert_transformers_config_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    """Keyword arguments for transformers' ``HubertConfig`` describing ``cfg``'s network (encoder only)."""
    return dict(_transformers_encoder_kwargs(cfg), feat_proj_layer_norm=True, conv_pos_batch_norm=False)


def torchaudio_hubert_pretrain_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    """Keyword arguments for ``torchaudio.models.wav2vec2.model.hubert_pretrain_model`` describing ``cfg``
    (one label set; torchaudio's projection is shared, i.e. ``untie_final_proj`` makes no difference)."""
    if len(cfg.num_classes) != 1:
        raise ValueError(f"torchaudio's HuBERT has exactly one label set, model.num_classes={cfg.num_classes}")
    kwargs = torchaudio_model_kwargs(cfg)
    kwargs.pop("aux_num_out")
    return dict(
        kwargs,
        mask_prob=cfg.mask_prob, mask_selection=cfg.mask_selection, mask_other=cfg.mask_other,
        mask_length=cfg.mask_length, no_mask_overlap=cfg.no_mask_overlap, mask_min_space=cfg.mask_min_space,
        mask_channel_prob=cfg.mask_channel_prob, mask_channel_selection=cfg.mask_channel_selection,
        mask_channel_other=cfg.mask_channel_other, mask_channel_length=cfg.mask_channel_length,
        no_mask_channel_overlap=cfg.no_mask_channel_overlap, mask_channel_min_space=cfg.mask_channel_min_space,
        skip_masked=cfg.skip_masked, skip_nomask=cfg.skip_nomask, num_classes=cfg.num_classes[0],
        final_dim=cfg.final_dim if cfg.final_dim > 0 else cfg.encoder_embed_dim,
        feature_grad_mult=cfg.feature_grad_mult,
    )
