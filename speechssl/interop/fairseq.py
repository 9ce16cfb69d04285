"""Import original fairseq checkpoints: wav2vec 2.0 / HuBERT / data2vec 2.0 pretraining and CTC fine-tuned
(Wav2VecCtc). data2vec 2.0 (``data2vec_multi``) has its own names and config layout: :mod:`speechssl.interop.data2vec`.

The file is read by :func:`speechssl.interop.unpickle.load_fairseq_checkpoint` (no fairseq needed, no
code run). Its configuration is ``cfg`` (2021+: ``cfg["model"]``, ``cfg["task"]``) or ``args`` (2020:
one ``argparse.Namespace``); fairseq's field names are speechssl's, so the model section maps one to
one onto :class:`~speechssl.config.ModelConfig` (fields fairseq leaves out take fairseq's defaults).
A fine-tuned checkpoint keeps the pretraining config in ``cfg.model.w2v_args`` and the output
dictionary nowhere: pass the ``dict.ltr.txt`` it was trained with (``--dict``).

Parameter names (``N`` layer index; the rest of the names are speechssl's)::

    fairseq                                              speechssl
    feature_extractor.conv_layers.N.0.{weight,bias}      feature_extractor.conv_layers.N.conv.*
    feature_extractor.conv_layers.0.2.*  (group norm)    feature_extractor.conv_layers.0.norm.*
    feature_extractor.conv_layers.N.2.1.*  (layer norm)  feature_extractor.conv_layers.N.norm.*
    layer_norm.*                                         feature_projection.layer_norm.*
    post_extract_proj.*                                  feature_projection.projection.*
    encoder.pos_conv.0.bias                              encoder.pos_conv.conv.bias
    encoder.pos_conv.0.weight_g | .parametrizations.weight.original0
                                                         encoder.pos_conv.conv.parametrizations.weight.original0
    encoder.pos_conv.0.weight_v | .parametrizations.weight.original1
                                                         encoder.pos_conv.conv.parametrizations.weight.original1
    encoder.layers.N.self_attn.{q,k,v}_proj.*            encoder.layers.N.self_attn.qkv_proj.*  (concatenated)
    mask_emb, encoder.layer_norm, encoder.layers.N.{self_attn.out_proj, self_attn_layer_norm, fc1, fc2,
    final_layer_norm}, quantizer.{vars, weight_proj}, project_q, final_proj, label_embs_concat: same names
    w2v_encoder.w2v_model.<above>  (fine-tuned)          w2v_model.<above>
    w2v_encoder.proj.*  (fine-tuned)                     proj.*

``post_extract_proj`` exists only when the last conv layer's channel count differs from
``encoder_embed_dim`` (fairseq builds it only then; so does speechssl).

HuBERT label embeddings: fairseq's ``Dictionary.load`` of ``dict.km.txt`` prepends ``<s> <pad> </s>
<unk>``, so a fairseq HuBERT with K clusters has ``label_embs_concat`` of ``4 + K`` rows and its softmax
has ``4 + K`` candidates (the four specials are never targets). speechssl's label set is the K clusters
alone (class ``k`` = fairseq row ``4 + k``, the ``k``-th line of ``dict.km.txt``), and its softmax has K
candidates, as torchaudio's. :func:`label_embs_from_fairseq` (import) drops the four rows,
:func:`label_embs_to_fairseq` (:func:`fairseq_state_dict`) puts four zero rows back in front.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from torch import Tensor

from speechssl.config import ModelConfig, coerce
from speechssl.interop import data2vec
from speechssl.interop.common import InteropError, imported_config
from speechssl.interop.unpickle import load_fairseq_checkpoint

# fairseq's Wav2Vec2Config / HubertConfig defaults where they differ from ModelConfig's (which are the
# BASE recipe's): used for fields a checkpoint's config leaves out (2020 ``args`` checkpoints list them all).
FAIRSEQ_DEFAULTS = {
    "wav2vec2": dict(feature_grad_mult=1.0, encoder_layerdrop=0.0, dropout_input=0.0, dropout_features=0.0,
                     final_dim=0, quantize_targets=False),
    "hubert": dict(feature_grad_mult=1.0, encoder_layerdrop=0.0, dropout_input=0.0, dropout_features=0.0,
                   final_dim=0, quantize_targets=False, untie_final_proj=False),
}
# fairseq options whose non-default values this implementation does not have
UNSUPPORTED = {"layer_type": "transformer", "pos_conv_depth": 1, "quantize_input": False, "target_glu": False,
               "same_quantizer": False, "quantizer_depth": 1, "adp_num": -1, "pos_enc_type": "abs"}
# fairseq model name (or arch prefix, e.g. wav2vec2_large_lv60k) -> kind; CTC names first (hubert_ctc is
# also a hubert_* arch name)
_MODEL_NAMES = {"wav2vec_ctc": "ctc", "hubert_ctc": "ctc", "wav2vec2": "wav2vec2", "hubert": "hubert",
                "data2vec_multi": "data2vec2"}

_RULES = [
    (r"feature_extractor\.conv_layers\.(\d+)\.0\.(weight|bias)", r"feature_extractor.conv_layers.\1.conv.\2"),
    (r"feature_extractor\.conv_layers\.0\.2\.(weight|bias)", r"feature_extractor.conv_layers.0.norm.\1"),
    (r"feature_extractor\.conv_layers\.(\d+)\.2\.1\.(weight|bias)", r"feature_extractor.conv_layers.\1.norm.\2"),
    (r"layer_norm\.(weight|bias)", r"feature_projection.layer_norm.\1"),
    (r"post_extract_proj\.(weight|bias)", r"feature_projection.projection.\1"),
    (r"encoder\.pos_conv\.0\.bias", "encoder.pos_conv.conv.bias"),
    (r"encoder\.pos_conv\.0\.(?:weight_g|parametrizations\.weight\.original0)",
     "encoder.pos_conv.conv.parametrizations.weight.original0"),
    (r"encoder\.pos_conv\.0\.(?:weight_v|parametrizations\.weight\.original1)",
     "encoder.pos_conv.conv.parametrizations.weight.original1"),
    (r"(mask_emb|label_embs_concat|quantizer\.vars)", r"\1"),
    (r"(encoder\.layer_norm|quantizer\.weight_proj|project_q|final_proj)\.(weight|bias)", r"\1.\2"),
    (r"encoder\.layers\.(\d+)\.(self_attn\.out_proj|self_attn_layer_norm|fc1|fc2|final_layer_norm)\.(weight|bias)",
     r"encoder.layers.\1.\2.\3"),
]
_QKV = re.compile(r"encoder\.layers\.(\d+)\.self_attn\.(q|k|v)_proj\.(weight|bias)")
_IGNORED = re.compile(r"(.*\.)?(_float_tensor|version)")  # fairseq bookkeeping buffers


def convert_upstream_state_dict(state_dict: Mapping[str, Tensor], source: str = "checkpoint") -> dict[str, Tensor]:
    """fairseq Wav2Vec2Model / HubertModel weights -> speechssl names (table in the module docstring).
    Unknown keys raise InteropError listing them."""
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, Tensor]] = {}
    unknown = []
    for key, value in state_dict.items():
        m = _QKV.fullmatch(key)
        if m:
            qkv.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = value
            continue
        for pattern, target in _RULES:
            if re.fullmatch(pattern, key):
                out[re.sub(pattern, target, key)] = value
                break
        else:
            if not _IGNORED.fullmatch(key):
                unknown.append(key)
    if unknown:
        raise InteropError(f"{source}: {len(unknown)} fairseq parameters have no speechssl counterpart: "
                           f"{unknown[:8]}{' ...' if len(unknown) > 8 else ''}")
    for (layer, kind), parts in sorted(qkv.items()):
        if set(parts) != {"q", "k", "v"}:
            raise InteropError(f"{source}: layer {layer} attention {kind} needs q, k and v, found {sorted(parts)}")
        out[f"encoder.layers.{layer}.self_attn.qkv_proj.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


# fairseq's Dictionary specials <s> <pad> </s> <unk>, the first rows of every HuBERT label set
FAIRSEQ_DICT_SPECIALS = 4


def label_embs_from_fairseq(emb: Tensor, source: str = "checkpoint") -> Tensor:
    """fairseq's ``(4 + K, F)`` label embeddings of one label set -> speechssl's ``(K, F)`` (rows ``4..``)."""
    if emb.dim() != 2 or emb.shape[0] <= FAIRSEQ_DICT_SPECIALS:
        raise InteropError(f"{source}: label_embs_concat has shape {tuple(emb.shape)}; a fairseq HuBERT has "
                           f"{FAIRSEQ_DICT_SPECIALS} dictionary specials (<s> <pad> </s> <unk>) plus one row per "
                           "cluster")
    return emb[FAIRSEQ_DICT_SPECIALS:]


def label_embs_to_fairseq(emb: Tensor, num_classes: list[int]) -> Tensor:
    """speechssl's ``(sum K_i, F)`` label embeddings -> fairseq's ``(sum (4 + K_i), F)``: per label set, four
    zero rows for the dictionary specials (never targets), then the set's K_i rows."""
    if emb.shape[0] != sum(num_classes):
        raise InteropError(f"label_embs_concat has {emb.shape[0]} rows, model.num_classes={num_classes}")
    parts = []
    for rows in emb.split(list(num_classes)):
        parts += [emb.new_zeros(FAIRSEQ_DICT_SPECIALS, emb.shape[1]), rows]
    return torch.cat(parts)


def fairseq_state_dict(state_dict: Mapping[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """speechssl Wav2Vec2Model / HubertModel weights -> fairseq's names and layout (the inverse of
    :func:`convert_upstream_state_dict`): q/k/v split, weight norm as ``weight_g`` / ``weight_v``, HuBERT
    label embeddings with fairseq's four dictionary rows per label set."""
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        m = re.fullmatch(r"encoder\.layers\.(\d+)\.self_attn\.qkv_proj\.(weight|bias)", key)
        if m:
            for part, chunk in zip("qkv", value.chunk(3)):
                out[f"encoder.layers.{m.group(1)}.self_attn.{part}_proj.{m.group(2)}"] = chunk.clone()
            continue
        m = re.fullmatch(r"feature_extractor\.conv_layers\.(\d+)\.(conv|norm)\.(weight|bias)", key)
        if m:
            i, kind, part = m.groups()
            inner = "0" if kind == "conv" else ("2.1" if cfg.extractor_mode == "layer_norm" else "2")
            out[f"feature_extractor.conv_layers.{i}.{inner}.{part}"] = value
            continue
        name = (key.replace("feature_projection.layer_norm.", "layer_norm.")
                .replace("feature_projection.projection.", "post_extract_proj.")
                .replace("encoder.pos_conv.conv.parametrizations.weight.original0", "encoder.pos_conv.0.weight_g")
                .replace("encoder.pos_conv.conv.parametrizations.weight.original1", "encoder.pos_conv.0.weight_v")
                .replace("encoder.pos_conv.conv.bias", "encoder.pos_conv.0.bias"))
        out[name] = value
    if "label_embs_concat" in out:
        out["label_embs_concat"] = label_embs_to_fairseq(out["label_embs_concat"], list(cfg.num_classes))
    return out


def model_config_from_fairseq(section: Mapping[str, Any], name: str, source: str = "checkpoint") -> ModelConfig:
    """A fairseq model config section (``cfg.model`` or the ``args`` dict) -> :class:`ModelConfig`."""
    for key, default in UNSUPPORTED.items():
        value = section.get(key, default)
        if value is not None and value != default:
            raise InteropError(f"{source}: model.{key}={value!r} is not supported by speechssl (only {default!r})")
    types = typing.get_type_hints(ModelConfig)
    values: dict[str, Any] = dict(FAIRSEQ_DEFAULTS[name])
    for key, value in section.items():
        unresolved = isinstance(value, str) and (value.startswith("${") or value == "???")  # omegaconf
        if key in types and key not in ("name", "num_classes", "w2v_path") and value is not None and not unresolved:
            values[key] = value
    typed = {k: coerce(v, types[k], f"{source}: model.{k}") for k, v in values.items()}
    return ModelConfig(name=name, **typed)


def _sections(ckpt: dict[str, Any], source: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(model section, task section) of a fairseq checkpoint's config (``cfg`` or ``args``)."""
    cfg = ckpt.get("cfg")
    if isinstance(cfg, dict) and isinstance(cfg.get("model"), dict):
        return cfg["model"], cfg.get("task") or {}
    args = ckpt.get("args")
    if isinstance(args, dict):
        model = dict(args)
        model.setdefault("_name", args.get("arch"))
        return model, args
    raise InteropError(f"{source}: no fairseq configuration (neither 'cfg' with a model section nor 'args'); "
                       "is this a fairseq checkpoint?")


def _model_kind(model_section: Mapping[str, Any], source: str) -> str:
    name = str(model_section.get("_name") or "")
    for prefix, kind in _MODEL_NAMES.items():
        if name == prefix or name.startswith(prefix + "_"):
            return kind
    raise InteropError(f"{source}: fairseq model '{name}' is not supported; speechssl imports wav2vec2, hubert, "
                       "data2vec_multi (audio), wav2vec_ctc and hubert_ctc checkpoints")


def read_dictionary(path: str | Path) -> list[str]:
    """A fairseq ``dict.ltr.txt`` -> CTC output symbols in fairseq's order: ``<s>, <pad>, </s>, <unk>``,
    then the file's symbols (blank = ``<s>`` = index 0, as fairseq's CTC)."""
    symbols = ["<s>", "<pad>", "</s>", "<unk>"]
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.rstrip().split(" ")
        if len(parts) < 2:
            raise InteropError(f"{path}:{n}: expected '<symbol> <count>', got {line!r}")
        symbols.append(parts[0])
    return symbols


def import_fairseq(path: str | Path, dictionary: Optional[str | Path] = None):
    """An original fairseq checkpoint -> ``(speechssl state dict, Config, num_updates)``."""
    source = str(path)
    ckpt = load_fairseq_checkpoint(path)
    weights = ckpt.get("model")
    if not isinstance(weights, dict):
        raise InteropError(f"{source}: no 'model' state dict in the checkpoint")
    model_section, task_section = _sections(ckpt, source)
    kind = _model_kind(model_section, source)
    history = ckpt.get("optimizer_history")
    num_updates = int(history[-1].get("num_updates", 0) or 0) if isinstance(history, list) and history else 0
    if kind == "data2vec2":
        cfg = data2vec.model_config_from_fairseq(model_section, source)
        state = data2vec.convert_fairseq_state_dict(weights, cfg.prenet_depth, source)
        config = imported_config(cfg, sample_rate=int(task_section.get("sample_rate", 16000) or 16000),
                                 normalize=bool(task_section.get("normalize", False)))
        return state, config, num_updates
    if kind != "ctc":
        state = convert_upstream_state_dict(weights, source)
        cfg = model_config_from_fairseq(model_section, kind, source)
        if kind == "hubert":
            cfg = _hubert_classes(cfg, state, task_section, source)
        config = imported_config(cfg, sample_rate=int(task_section.get("sample_rate", 16000) or 16000),
                                 normalize=bool(task_section.get("normalize", False)),
                                 label_rate=float(task_section.get("label_rate", -1.0) or -1.0))
        return state, config, num_updates
    return _import_ctc(weights, model_section, task_section, dictionary, source, num_updates)


def _hubert_classes(cfg: ModelConfig, state: dict[str, Tensor], task: Mapping[str, Any], source: str) -> ModelConfig:
    """fairseq stores no dictionary: the class count is the label embedding's rows less fairseq's four
    dictionary specials (one label set); their rows are dropped from ``state`` (module docstring)."""
    labels = task.get("labels") or ["km"]
    emb = state.get("label_embs_concat")
    if emb is None:
        return cfg
    if len(labels) != 1:
        raise InteropError(f"{source}: {len(labels)} label sets share label_embs_concat; speechssl cannot tell "
                           "their sizes apart (import single-label HuBERT checkpoints)")
    state["label_embs_concat"] = label_embs_from_fairseq(emb, source)
    label_rate = float(task.get("label_rate", -1.0) or -1.0)
    return dataclasses.replace(cfg, num_classes=[int(state["label_embs_concat"].shape[0])], label_rate=label_rate)


def _import_ctc(weights: dict[str, Tensor], model_section: Mapping[str, Any], task_section: Mapping[str, Any],
                dictionary: Optional[str | Path], source: str, num_updates: int):
    if dictionary is None:
        raise InteropError(f"{source}: a fine-tuned fairseq checkpoint does not contain its output dictionary; "
                           "pass the dict.ltr.txt it was trained with (--dict)")
    vocab = read_dictionary(dictionary)
    w2v_args = model_section.get("w2v_args")
    if not isinstance(w2v_args, dict):
        raise InteropError(f"{source}: the fine-tuned model has no w2v_args (the pretraining config); speechssl "
                           "cannot rebuild the upstream without it")
    inner_model, inner_task = _sections({"cfg": w2v_args} if "model" in w2v_args else {"args": w2v_args}, source)
    kind = _model_kind(inner_model, source)
    if kind == "data2vec2":
        cfg = data2vec.model_config_from_fairseq(inner_model, source, pretraining=False)
    else:
        cfg = model_config_from_fairseq(inner_model, kind, source)
    # fine-tuning overrides, fairseq's Wav2Vec2AsrConfig names (layerdrop -> encoder_layerdrop)
    over = {k: model_section[k] for k in ("dropout", "attention_dropout", "activation_dropout", "dropout_input",
                                          "mask_prob", "mask_length", "mask_channel_prob", "mask_channel_length",
                                          "feature_grad_mult", "apply_mask", "final_dropout",
                                          "freeze_finetune_updates", "mask_selection", "mask_other",
                                          "mask_channel_selection", "mask_channel_other")
            if model_section.get(k) is not None}
    if model_section.get("layerdrop") is not None:
        over["encoder_layerdrop"] = model_section["layerdrop"]
    types = typing.get_type_hints(ModelConfig)
    cfg = dataclasses.replace(cfg, **{k: coerce(v, types[k], f"{source}: model.{k}") for k, v in over.items()},
                              quantize_targets=False, num_classes=[])
    if kind == "data2vec2":
        state = data2vec.fairseq_ctc_upstream(weights, cfg.prenet_depth, source)
    else:
        upstream = {k[len("w2v_encoder.w2v_model."):]: v for k, v in weights.items()
                    if k.startswith("w2v_encoder.w2v_model.")}
        state = {f"w2v_model.{k}": v for k, v in convert_upstream_state_dict(upstream, source).items()
                 if not k.startswith(("quantizer.", "project_q.", "final_proj.", "label_embs_concat"))}
    for part in ("weight", "bias"):
        key = f"w2v_encoder.proj.{part}"
        if key not in weights:
            raise InteropError(f"{source}: no {key} (the CTC output layer)")
        state[f"proj.{part}"] = weights[key]
    if state["proj.weight"].shape[0] != len(vocab):
        raise InteropError(f"{source}: the output layer has {state['proj.weight'].shape[0]} symbols but "
                           f"{dictionary} gives {len(vocab)} (with fairseq's 4 special symbols); wrong dictionary?")
    # fairseq asserts that fine-tuning normalised as pretraining did; a checkpoint where they differ is refused
    upstream_norm = bool(inner_task.get("normalize", inner_model.get("normalize", False)))
    normalize = bool(task_section.get("normalize", upstream_norm))
    if normalize != upstream_norm:
        raise InteropError(f"{source}: task.normalize={str(normalize).lower()} but its upstream (w2v_args) was "
                           f"pretrained with normalize={str(upstream_norm).lower()}; fairseq itself refuses such a "
                           "model, so speechssl does not guess which one its weights expect")
    config = imported_config(cfg, sample_rate=int(inner_task.get("sample_rate", 16000) or 16000),
                             normalize=normalize, vocab=vocab)
    return state, config, num_updates
