"""speechssl parameter names -> transformers / torchaudio names (the inverse of
:func:`speechssl.models.weights.convert_reference_state_dict`, whose module docstring has the table).

Names are for the upstream (``Wav2Vec2Model`` / ``HubertModel``) without any prefix: transformers puts
it under ``wav2vec2.`` / ``hubert.`` in its task models, torchaudio's encoder under ``encoder.``.
"""

from __future__ import annotations

import re
from typing import Mapping

import torch
from torch import Tensor

_ENCODER_LAYER = r"encoder\.layers\.(\d+)\."
# (speechssl pattern, transformers name, torchaudio name or None when torchaudio has no such parameter)
_RULES: list[tuple[str, str, str | None]] = [
    (r"feature_extractor\.conv_layers\.(\d+)\.conv\.(weight|bias)",
     r"feature_extractor.conv_layers.\1.conv.\2", r"feature_extractor.conv_layers.\1.conv.\2"),
    (r"feature_extractor\.conv_layers\.(\d+)\.norm\.(weight|bias)",
     r"feature_extractor.conv_layers.\1.layer_norm.\2", r"feature_extractor.conv_layers.\1.layer_norm.\2"),
    (r"feature_projection\.(layer_norm|projection)\.(weight|bias)",
     r"feature_projection.\1.\2", r"encoder.feature_projection.\1.\2"),
    (r"mask_emb", "masked_spec_embed", None),
    (r"encoder\.pos_conv\.conv\.(bias|parametrizations\.weight\.original[01])",
     r"encoder.pos_conv_embed.conv.\1", r"encoder.transformer.pos_conv_embed.conv.\1"),
    (r"encoder\.layer_norm\.(weight|bias)", r"encoder.layer_norm.\1", r"encoder.transformer.layer_norm.\1"),
    (r"encoder\.pos_conv\.layers\.(\d+)\.conv\.(weight|bias)", r"encoder.pos_conv_embed.layers.\1.conv.\2", None),
    (_ENCODER_LAYER + r"self_attn\.out_proj\.(weight|bias)",
     r"encoder.layers.\1.attention.out_proj.\2", r"encoder.transformer.layers.\1.attention.out_proj.\2"),
    (_ENCODER_LAYER + r"self_attn_layer_norm\.(weight|bias)",
     r"encoder.layers.\1.layer_norm.\2", r"encoder.transformer.layers.\1.layer_norm.\2"),
    (_ENCODER_LAYER + r"fc1\.(weight|bias)", r"encoder.layers.\1.feed_forward.intermediate_dense.\2",
     r"encoder.transformer.layers.\1.feed_forward.intermediate_dense.\2"),
    (_ENCODER_LAYER + r"fc2\.(weight|bias)", r"encoder.layers.\1.feed_forward.output_dense.\2",
     r"encoder.transformer.layers.\1.feed_forward.output_dense.\2"),
    (_ENCODER_LAYER + r"final_layer_norm\.(weight|bias)", r"encoder.layers.\1.final_layer_norm.\2",
     r"encoder.transformer.layers.\1.final_layer_norm.\2"),
]
_QKV = re.compile(_ENCODER_LAYER + r"self_attn\.qkv_proj\.(weight|bias)")
# wav2vec 2.0 pretraining heads: speechssl -> transformers Wav2Vec2ForPreTraining (top level, no prefix)
PRETRAINING_HEADS = {
    "quantizer.vars": "quantizer.codevectors",
    "quantizer.weight_proj.weight": "quantizer.weight_proj.weight",
    "quantizer.weight_proj.bias": "quantizer.weight_proj.bias",
    "project_q.weight": "project_q.weight",
    "project_q.bias": "project_q.bias",
    "final_proj.weight": "project_hid.weight",
    "final_proj.bias": "project_hid.bias",
}


def upstream_to_reference(state_dict: Mapping[str, Tensor], flavor: str) -> tuple[dict[str, Tensor], list[str]]:
    """speechssl upstream weights -> ``flavor`` ("transformers" or "torchaudio") encoder weights.

    The fused ``qkv_proj`` is split into ``q_proj``/``k_proj``/``v_proj``. Returns ``(weights,
    unmapped speechssl keys)``: the pretraining heads and, for torchaudio, ``mask_emb`` are unmapped.
    A model without feature projection (conv channels == ``encoder_embed_dim``, as fairseq) gets an
    identity one (weight ``I``, bias 0): both toolkits always apply a Linear there.
    """
    if flavor not in ("transformers", "torchaudio"):
        raise ValueError(f"flavor must be 'transformers' or 'torchaudio', got {flavor!r}")
    column = 1 if flavor == "transformers" else 2
    layers = "encoder.layers" if flavor == "transformers" else "encoder.transformer.layers"
    out: dict[str, Tensor] = {}
    unmapped = []
    norm = state_dict.get("feature_projection.layer_norm.weight")
    if norm is not None and "feature_projection.projection.weight" not in state_dict:
        prefix = ("" if flavor == "transformers" else "encoder.") + "feature_projection.projection"
        out[f"{prefix}.weight"] = torch.eye(norm.shape[0], dtype=norm.dtype)
        out[f"{prefix}.bias"] = torch.zeros(norm.shape[0], dtype=norm.dtype)
    for key, value in state_dict.items():
        m = _QKV.fullmatch(key)
        if m:
            for name, part in zip("qkv", value.chunk(3, dim=0)):
                out[f"{layers}.{m.group(1)}.attention.{name}_proj.{m.group(2)}"] = part.clone()
            continue
        for rule in _RULES:
            target = rule[column]
            if re.fullmatch(rule[0], key):
                if target is None:
                    unmapped.append(key)
                else:
                    out[re.sub(rule[0], target, key)] = value
                break
        else:
            unmapped.append(key)
    return out, unmapped
