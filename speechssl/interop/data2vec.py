"""data2vec weights and configs: fairseq's data2vec 2.0 (``data2vec_multi``, audio) and transformers'
data2vec audio (``Data2VecAudioModel`` / ``Data2VecAudioForCTC``, the data2vec 1.0 encoder) <-> speechssl's
:class:`~speechssl.models.data2vec2.Data2Vec2Model`.

fairseq parameter names (``A`` = ``modality_encoders.AUDIO.``; ``N`` layer, ``P`` = ``model.prenet_depth``)::

    fairseq                                              speechssl
    A.local_encoder.conv_layers.N.0.weight               feature_extractor.conv_layers.N.conv.weight
    A.local_encoder.conv_layers.N.2.1.* (layer norm)     feature_extractor.conv_layers.N.norm.*
    A.local_encoder.conv_layers.0.2.* (group norm)       feature_extractor.conv_layers.0.norm.*
    A.project_features.1.* / .2.*                        feature_projection.layer_norm.* / .projection.*
    A.relative_positional_encoder.{N+1}.0.*              encoder.pos_conv.layers.N.conv.*
    A.context_encoder.norm.*                             encoder.layer_norm.*
    A.alibi_scale (1, 1, H or 1, 1, 1)                   encoder.alibi_scale (H or 1,)
    A.context_encoder.blocks.N.* (prenet)                encoder.layers.N.*
    blocks.N.*                                           encoder.layers.{P+N}.*
        attn.qkv / attn.proj / norm1 / norm2 / mlp.fc1 / mlp.fc2
                                                         self_attn.qkv_proj / self_attn.out_proj /
                                                         self_attn_layer_norm / final_layer_norm / fc1 / fc2
    A.decoder.blocks.N.0.* / A.decoder.proj.*            decoder.blocks.N.* / decoder.proj.*
    _ema[<teacher name>] (the EMA teacher's weights,     teacher.<encoder name without "encoder.">
        a dict inside the state dict)
    w2v_encoder.w2v_model.<above> / w2v_encoder.proj.*   w2v_model.<above> / proj.*   (CTC fine-tuned)

transformers' data2vec audio uses wav2vec 2.0's names (:mod:`speechssl.models.weights`) under
``data2vec_audio.`` in its task models, plus ``encoder.pos_conv_embed.layers.N.conv.*`` for the positional
stack (``encoder.pos_conv.layers.N.conv.*``). Its encoder is data2vec 2.0's without ALiBi
(``use_alibi_encoder: false``); its ``masked_spec_embed`` (the fine-tuning mask embedding; speechssl's data2vec
masks with noise, as fairseq's data2vec 2.0) is not imported. A model imported without a teacher (transformers,
a fine-tuned fairseq model) gets one copied from its encoder, where a fresh run starts too.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from typing import Any, Mapping

from torch import Tensor

from speechssl.config import ModelConfig, coerce, parse_literal
from speechssl.interop.common import InteropError

# ---------------------------------------------------------------------------------------------------
# the teacher


def with_teacher_from_encoder(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """``state`` with ``teacher.*`` set to copies of the ``encoder.*`` weights (a teacher that starts where a
    fresh run's does: equal to the student)."""
    out = {k: v for k, v in state.items() if not k.startswith("teacher.")}
    out.update({"teacher." + k[len("encoder."):]: v.clone() for k, v in state.items() if k.startswith("encoder.")})
    return out


# ---------------------------------------------------------------------------------------------------
# transformers


def config_from_transformers(hf_config: Any) -> ModelConfig:
    """A transformers ``Data2VecAudioConfig`` (object or dict) -> :class:`ModelConfig` (``name: data2vec2``,
    ``use_alibi_encoder: false``). transformers has no gradient scale on the extractor (1.0), no dropout
    slot after its prenet, and no pretraining head: the decoder and teacher settings are data2vec 2.0 BASE's."""
    from speechssl.models.data2vec2 import data2vec2_base_config

    c = (lambda k: hf_config[k]) if isinstance(hf_config, Mapping) else (lambda k: getattr(hf_config, k))
    depth, kernel = int(c("num_conv_pos_embeddings")), int(c("conv_pos_kernel_size"))
    return dataclasses.replace(
        data2vec2_base_config(),
        extractor_mode="layer_norm",
        conv_feature_layers=[tuple(v) for v in zip(c("conv_dim"), c("conv_kernel"), c("conv_stride"))],
        conv_bias=bool(c("conv_bias")), feature_grad_mult=1.0,
        encoder_layers=c("num_hidden_layers"), encoder_embed_dim=c("hidden_size"),
        encoder_ffn_embed_dim=c("intermediate_size"), encoder_attention_heads=c("num_attention_heads"),
        activation_fn=c("hidden_act"), dropout=c("hidden_dropout"), attention_dropout=c("attention_dropout"),
        activation_dropout=c("activation_dropout"), encoder_layerdrop=c("layerdrop"), dropout_input=0.0,
        conv_pos_depth=depth, conv_pos_width=kernel * depth, conv_pos_groups=c("num_conv_pos_embedding_groups"),
        pos_conv_zero_padding=True, use_alibi_encoder=False, prenet_depth=0,
        average_top_k_layers=min(8, int(c("num_hidden_layers"))),
        mask_prob=c("mask_time_prob"), mask_length=c("mask_time_length"),
        mask_channel_prob=c("mask_feature_prob"), mask_channel_length=c("mask_feature_length"),
    )


def transformers_config_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    """Keyword arguments for transformers' ``Data2VecAudioConfig`` describing ``cfg``'s student encoder;
    InteropError when transformers cannot compute what it computes."""
    problems = []
    if cfg.use_alibi_encoder:
        problems.append("ALiBi attention (model.use_alibi_encoder: transformers' data2vec audio is the data2vec 1.0 "
                        "encoder, without it)")
    if cfg.extractor_mode != "layer_norm":
        problems.append(f"model.extractor_mode={cfg.extractor_mode} (transformers: layer norm after every conv)")
    if not cfg.pos_conv_zero_padding:
        problems.append("model.pos_conv_zero_padding=false (transformers zeroes padded frames first)")
    kernel = max(3, cfg.conv_pos_width // cfg.conv_pos_depth)
    if problems:
        raise InteropError("transformers' Data2VecAudioModel cannot represent this model: " + "; ".join(problems))
    layers = cfg.conv_feature_layers
    return dict(
        conv_dim=[c for c, _, _ in layers], conv_kernel=[k for _, k, _ in layers],
        conv_stride=[s for _, _, s in layers], conv_bias=cfg.conv_bias, feat_extract_activation="gelu",
        num_hidden_layers=cfg.encoder_layers, hidden_size=cfg.encoder_embed_dim,
        intermediate_size=cfg.encoder_ffn_embed_dim, num_attention_heads=cfg.encoder_attention_heads,
        hidden_act=cfg.activation_fn, hidden_dropout=cfg.dropout, attention_dropout=cfg.attention_dropout,
        activation_dropout=cfg.activation_dropout, layerdrop=cfg.encoder_layerdrop, feat_proj_dropout=0.0,
        num_conv_pos_embeddings=cfg.conv_pos_depth, conv_pos_kernel_size=kernel,
        num_conv_pos_embedding_groups=cfg.conv_pos_groups,
        mask_time_prob=cfg.mask_prob, mask_time_length=cfg.mask_length, mask_time_min_masks=1,
        mask_feature_prob=cfg.mask_channel_prob, mask_feature_length=cfg.mask_channel_length, layer_norm_eps=1e-5,
    )


# ---------------------------------------------------------------------------------------------------
# fairseq

_A = r"modality_encoders\.AUDIO\."
_BLOCK = (r"(attn\.qkv|attn\.proj|norm1|norm2|mlp\.fc1|mlp\.fc2)\.(weight|bias)")
_BLOCK_NAMES = {"attn.qkv": "self_attn.qkv_proj", "attn.proj": "self_attn.out_proj", "norm1": "self_attn_layer_norm",
                "norm2": "final_layer_norm", "mlp.fc1": "fc1", "mlp.fc2": "fc2"}
_IGNORED = re.compile(r"(.*\.)?(_float_tensor|version)")


def _encoder_name(key: str, prenet_depth: int) -> str | None:
    """A fairseq name of the encoder part (student or teacher) -> speechssl's, without ``encoder.``."""
    m = re.fullmatch(_A + r"relative_positional_encoder\.(\d+)\.0\.(weight|bias)", key)
    if m:
        return f"pos_conv.layers.{int(m.group(1)) - 1}.conv.{m.group(2)}"
    m = re.fullmatch(_A + r"context_encoder\.norm\.(weight|bias)", key)
    if m:
        return f"layer_norm.{m.group(1)}"
    if re.fullmatch(_A + "alibi_scale", key):
        return "alibi_scale"
    m = re.fullmatch(_A + r"context_encoder\.blocks\.(\d+)\." + _BLOCK, key)
    if m:
        return f"layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}.{m.group(3)}"
    m = re.fullmatch(r"blocks\.(\d+)\." + _BLOCK, key)
    if m:
        return f"layers.{prenet_depth + int(m.group(1))}.{_BLOCK_NAMES[m.group(2)]}.{m.group(3)}"
    return None


def _front_name(key: str) -> str | None:
    m = re.fullmatch(_A + r"local_encoder\.conv_layers\.(\d+)\.0\.(weight|bias)", key)
    if m:
        return f"feature_extractor.conv_layers.{m.group(1)}.conv.{m.group(2)}"
    m = re.fullmatch(_A + r"local_encoder\.conv_layers\.(\d+)\.2(?:\.1)?\.(weight|bias)", key)
    if m:
        return f"feature_extractor.conv_layers.{m.group(1)}.norm.{m.group(2)}"
    m = re.fullmatch(_A + r"project_features\.([12])\.(weight|bias)", key)
    if m:
        return f"feature_projection.{'layer_norm' if m.group(1) == '1' else 'projection'}.{m.group(2)}"
    m = re.fullmatch(_A + r"decoder\.blocks\.(\d+)\.0\.(weight|bias)", key)
    if m:
        return f"decoder.blocks.{m.group(1)}.{m.group(2)}"
    m = re.fullmatch(_A + r"decoder\.proj\.(weight|bias)", key)
    if m:
        return f"decoder.proj.{m.group(1)}"
    return None


def convert_fairseq_state_dict(weights: Mapping[str, Any], prenet_depth: int,
                               source: str = "checkpoint") -> dict[str, Tensor]:
    """fairseq ``Data2VecMultiModel`` (audio) weights -> speechssl names (table in the module docstring).
    The EMA teacher comes from ``weights["_ema"]`` when there is one. Unknown keys raise InteropError."""
    out: dict[str, Tensor] = {}
    unknown = []
    for key, value in weights.items():
        if key == "_ema":
            continue
        name = _front_name(key)
        if name is None:
            inner = _encoder_name(key, prenet_depth)
            name = None if inner is None else "encoder." + inner
        if name is not None:
            out[name] = value.reshape(-1) if name.endswith("alibi_scale") else value
        elif not _IGNORED.fullmatch(key):
            unknown.append(key)
    ema = weights.get("_ema")
    if isinstance(ema, Mapping):
        for key, value in ema.items():
            inner = _encoder_name(key, prenet_depth)
            if inner is not None:
                out["teacher." + inner] = value.reshape(-1) if inner == "alibi_scale" else value
            elif not _IGNORED.fullmatch(key):
                unknown.append(f"_ema.{key}")
    if unknown:
        raise InteropError(f"{source}: {len(unknown)} fairseq data2vec 2.0 parameters have no speechssl counterpart: "
                           f"{unknown[:8]}{' ...' if len(unknown) > 8 else ''}")
    if not any(k.startswith("teacher.") for k in out) and any(k.startswith("encoder.") for k in out):
        out = with_teacher_from_encoder(out)
    return out


# fairseq's Data2VecMultiConfig / D2vAudioConfig / D2vDecoderConfig defaults, for keys a config leaves out
FAIRSEQ_MODEL_DEFAULTS = dict(depth=8, embed_dim=768, num_heads=12, mlp_ratio=4.0, norm_eps=1e-6, norm_affine=True,
                              encoder_dropout=0.1, attention_dropout=0.1, activation_dropout=0.0, dropout_input=0.0,
                              layerdrop=0.0, layer_norm_first=False, average_top_k_layers=8, end_of_block_targets=False,
                              clone_batch=1, layer_norm_target_layer=False, batch_norm_target_layer=False,
                              instance_norm_target_layer=False, instance_norm_targets=False, layer_norm_targets=False,
                              ema_decay=0.999, ema_end_decay=0.9999, ema_encoder_only=True, loss_beta=0.0,
                              loss_scale=None, min_target_var=0.1, min_pred_var=0.01, cls_loss=0.0, recon_loss=0.0,
                              d2v_loss=1.0)
FAIRSEQ_AUDIO_DEFAULTS = dict(extractor_mode="layer_norm",
                              feature_encoder_spec="[(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512,2,2)] + [(512,2,2)]",
                              conv_pos_width=95, conv_pos_groups=16, conv_pos_depth=5, conv_pos_pre_ln=False,
                              prenet_depth=4, mask_prob=0.7, mask_prob_adjust=0.0, mask_length=5, mask_noise_std=0.01,
                              inverse_mask=False, num_extra_tokens=0, use_alibi_encoder=False, alibi_scale=1.0,
                              learned_alibi=False, learned_alibi_scale=False, learned_alibi_scale_per_head=False,
                              learned_alibi_scale_per_layer=False, local_grad_mult=1.0, mask_channel_prob=0.0,
                              mask_channel_length=64, mask_dropout=0.0, keep_masked_pct=0.0, encoder_zero_mask=True)
FAIRSEQ_DECODER_DEFAULTS = dict(decoder_dim=384, decoder_groups=16, decoder_kernel=5, decoder_layers=5,
                                input_dropout=0.1, add_positions_masked=False, add_positions_all=False,
                                decoder_residual=True, projection_layers=1)
# (section, key, the only value speechssl implements)
_FIXED = [("model", "layer_norm_first", False), ("model", "norm_affine", True), ("model", "end_of_block_targets", False),
          ("model", "batch_norm_target_layer", False), ("model", "cls_loss", 0.0), ("model", "recon_loss", 0.0),
          ("model", "d2v_loss", 1.0), ("audio", "conv_pos_pre_ln", False), ("audio", "inverse_mask", False),
          ("audio", "num_extra_tokens", 0), ("audio", "learned_alibi", False), ("audio", "alibi_scale", 1.0),
          ("audio", "learned_alibi_scale_per_layer", False), ("audio", "keep_masked_pct", 0.0),
          ("decoder", "add_positions_masked", False), ("decoder", "add_positions_all", False),
          ("decoder", "decoder_residual", True), ("decoder", "projection_layers", 1)]


def _value(section: Mapping[str, Any], defaults: Mapping[str, Any], key: str) -> Any:
    value = section.get(key)
    unresolved = isinstance(value, str) and (value.startswith("${") or value == "???")  # omegaconf
    return defaults[key] if value is None or unresolved else value


def model_config_from_fairseq(section: Mapping[str, Any], source: str = "checkpoint",
                              pretraining: bool = True) -> ModelConfig:
    """A fairseq ``data2vec_multi`` model section (with ``modalities.audio``) -> :class:`ModelConfig`. Options
    speechssl does not implement are refused by name. ``pretraining``: the checkpoint holds the EMA teacher
    (fairseq's ``ema_encoder_only: true`` keeps only its layers, which speechssl's teacher cannot be)."""
    audio = (section.get("modalities") or {}).get("audio") or {}
    decoder = audio.get("decoder") or {}
    get_m = lambda k: _value(section, FAIRSEQ_MODEL_DEFAULTS, k)  # noqa: E731
    get_a = lambda k: _value(audio, FAIRSEQ_AUDIO_DEFAULTS, k)  # noqa: E731
    get_d = lambda k: _value(decoder, FAIRSEQ_DECODER_DEFAULTS, k)  # noqa: E731
    getters = {"model": get_m, "audio": get_a, "decoder": get_d}
    where = {"model": "model", "audio": "model.modalities.audio", "decoder": "model.modalities.audio.decoder"}
    for part, key, only in _FIXED:
        value = getters[part](key)
        if value != only:
            raise InteropError(f"{source}: {where[part]}.{key}={value!r} is not supported by speechssl's data2vec 2.0 "
                               f"(only {only!r})")
    if float(get_m("norm_eps")) != 1e-5:
        raise InteropError(f"{source}: model.norm_eps={get_m('norm_eps')} (speechssl's layer norms use 1e-5, as the "
                           "published audio models)")
    if pretraining and get_m("ema_encoder_only"):
        raise InteropError(f"{source}: model.ema_encoder_only=true (a teacher of the layers only); speechssl's teacher "
                           "is the EMA of the whole encoder (ema_encoder_only: false, as the published audio models)")
    try:
        spec = [tuple(int(v) for v in layer) for layer in parse_literal(str(get_a("feature_encoder_spec")))]
    except (ValueError, TypeError, SyntaxError) as exc:
        raise InteropError(f"{source}: model.modalities.audio.feature_encoder_spec: {exc}") from None
    dim, depth, prenet = int(get_m("embed_dim")), int(get_m("depth")), int(get_a("prenet_depth"))
    values = dict(
        extractor_mode=get_a("extractor_mode"), conv_feature_layers=spec, conv_bias=False,
        feature_grad_mult=get_a("local_grad_mult"),
        encoder_layers=prenet + depth, prenet_depth=prenet, encoder_embed_dim=dim,
        encoder_ffn_embed_dim=int(dim * float(get_m("mlp_ratio"))), encoder_attention_heads=get_m("num_heads"),
        layer_norm_first=False, dropout=get_m("encoder_dropout"), attention_dropout=get_m("attention_dropout"),
        activation_dropout=get_m("activation_dropout"), encoder_layerdrop=get_m("layerdrop"),
        dropout_input=get_m("dropout_input"), dropout_features=0.0,
        conv_pos_depth=get_a("conv_pos_depth"), conv_pos_width=get_a("conv_pos_width"),
        conv_pos_groups=get_a("conv_pos_groups"), pos_conv_zero_padding=False,
        use_alibi_encoder=get_a("use_alibi_encoder"), learned_alibi_scale=get_a("learned_alibi_scale"),
        learned_alibi_scale_per_head=get_a("learned_alibi_scale_per_head"),
        quantize_targets=False, final_dim=0,
        clone_batch=get_m("clone_batch"), mask_prob=get_a("mask_prob"), mask_prob_adjust=get_a("mask_prob_adjust"),
        mask_length=get_a("mask_length"), mask_noise_std=get_a("mask_noise_std"), mask_dropout=get_a("mask_dropout"),
        mask_channel_prob=get_a("mask_channel_prob"), mask_channel_length=get_a("mask_channel_length"),
        decoder_dim=get_d("decoder_dim"), decoder_layers=get_d("decoder_layers"),
        decoder_kernel=get_d("decoder_kernel"), decoder_groups=get_d("decoder_groups"),
        decoder_input_dropout=get_d("input_dropout"),
        average_top_k_layers=min(int(get_m("average_top_k_layers")), depth),
        instance_norm_target_layer=get_m("instance_norm_target_layer"),
        layer_norm_target_layer=get_m("layer_norm_target_layer"),
        instance_norm_targets=get_m("instance_norm_targets"), layer_norm_targets=get_m("layer_norm_targets"),
        ema_decay=get_m("ema_decay"), ema_end_decay=get_m("ema_end_decay"),
        loss_beta=get_m("loss_beta"), loss_scale=get_m("loss_scale"),
        min_target_var=get_m("min_target_var"), min_pred_var=get_m("min_pred_var"),
    )
    anneal = section.get("ema_anneal_end_step")
    if isinstance(anneal, (int, float)) and anneal >= 0:
        values["ema_anneal_end_step"] = int(anneal)
    elif isinstance(section.get("max_update"), (int, float)):
        values["ema_anneal_end_step"] = int(section["max_update"])
    types = typing.get_type_hints(ModelConfig)
    typed = {k: coerce(v, types[k], f"{source}: model.{k}") for k, v in values.items()}
    return ModelConfig(name="data2vec2", **typed)


def is_fairseq_data2vec(model_section: Mapping[str, Any]) -> bool:
    """A fairseq model section of data2vec 2.0 (``_name: data2vec_multi``)."""
    return str(model_section.get("_name") or "") == "data2vec_multi"


def fairseq_ctc_upstream(weights: Mapping[str, Tensor], prenet_depth: int, source: str) -> dict[str, Tensor]:
    """A fine-tuned fairseq data2vec 2.0's ``w2v_encoder.w2v_model.*`` weights -> speechssl ``w2v_model.*``
    (no teacher and decoder: fairseq removed them for fine-tuning, and so does speechssl's CTC model)."""
    upstream = {k[len("w2v_encoder.w2v_model."):]: v for k, v in weights.items()
                if k.startswith("w2v_encoder.w2v_model.")}
    state = convert_fairseq_state_dict(upstream, prenet_depth, source)
    return {f"w2v_model.{k}": v for k, v in state.items() if not k.startswith(("teacher.", "decoder."))}


__all__ = ["config_from_transformers", "convert_fairseq_state_dict", "fairseq_ctc_upstream", "is_fairseq_data2vec",
           "model_config_from_fairseq", "transformers_config_kwargs", "with_teacher_from_encoder"]
