"""Hugging Face transformers folders: export speechssl models to them and import them (local folders only).

Export writes ``config.json`` + ``model.safetensors`` that transformers loads with::

    wav2vec 2.0 pretraining  -> Wav2Vec2ForPreTraining   (quantizer, project_q, project_hid included)
    HuBERT pretraining       -> HubertModel              (final_proj / label embeddings: no counterpart, left out)
    CTC (wav2vec 2.0/HuBERT) -> Wav2Vec2ForCTC / HubertForCTC, plus vocab.json, tokenizer_config.json,
                                special_tokens_map.json and preprocessor_config.json, so that
                                ``Wav2Vec2Processor.from_pretrained(DIR)`` decodes the model's output

Parameter names: :mod:`speechssl.interop.names` (and :mod:`speechssl.models.weights` for the other
way). CTC vocabularies are fairseq's (``<s> <pad> </s> <unk> ...``, blank = index 0); transformers' CTC
tokenizer treats its pad token as the blank, so the first two names are swapped in ``vocab.json``
(index 0 ``<pad>``, index 1 ``<s>``), exactly as the converted fairseq models on the Hub have them;
import swaps them back.
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
from speechssl.interop.names import PRETRAINING_HEADS, upstream_to_reference
from speechssl.models.weights import config_from_transformers, convert_reference_state_dict, transformers_config_kwargs

_QUANTIZER_KEYS = ("proj_codevector_dim", "num_codevectors_per_group", "num_codevector_groups", "codevector_dim",
                   "num_negatives", "contrastive_logits_temperature", "feat_quantizer_dropout")
SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")


def hf_config(loaded: Loaded) -> dict[str, Any]:
    """The ``config.json`` content for ``loaded``'s model."""
    cfg = loaded.cfg.model
    kwargs = transformers_config_kwargs(cfg)
    hubert = cfg.name == "hubert"
    if hubert:
        kwargs = {k: v for k, v in kwargs.items() if k not in _QUANTIZER_KEYS}
        kwargs.update(feat_proj_layer_norm=True, conv_pos_batch_norm=False)
    if loaded.is_ctc:
        arch = "HubertForCTC" if hubert else "Wav2Vec2ForCTC"
        kwargs.update(vocab_size=len(loaded.vocab), pad_token_id=0, bos_token_id=1, eos_token_id=2,
                      ctc_loss_reduction="sum", ctc_zero_infinity=True, final_dropout=cfg.final_dropout)
    elif hubert:
        arch = "HubertModel"
    else:
        arch = "Wav2Vec2ForPreTraining" if cfg.quantize_targets else "Wav2Vec2Model"
    return {"architectures": [arch], "model_type": "hubert" if hubert else "wav2vec2", **kwargs}


def hf_state_dict(loaded: Loaded) -> tuple[dict[str, Tensor], list[str]]:
    """transformers weights for ``loaded`` and the speechssl keys left out."""
    cfg = loaded.cfg.model
    upstream = loaded.upstream.state_dict()
    heads = {k: v for k, v in upstream.items() if k in PRETRAINING_HEADS or k == "label_embs_concat"}
    body, unmapped = upstream_to_reference({k: v for k, v in upstream.items() if k not in heads}, "transformers")
    prefix = "hubert." if cfg.name == "hubert" else "wav2vec2."
    arch = hf_config(loaded)["architectures"][0]
    if arch in ("HubertModel", "Wav2Vec2Model"):
        out = dict(body)
        unmapped += sorted(heads)
    else:
        out = {prefix + k: v for k, v in body.items()}
        if arch == "Wav2Vec2ForPreTraining":
            out.update({PRETRAINING_HEADS[k]: v for k, v in heads.items()})
        if loaded.is_ctc:
            proj = loaded.model.proj
            out["lm_head.weight"], out["lm_head.bias"] = proj.weight.detach(), proj.bias.detach()
    return {k: v.detach().contiguous().clone() for k, v in out.items()}, unmapped


def _tokenizer_files(loaded: Loaded) -> dict[str, Any]:
    vocab = loaded.vocab
    if tuple(vocab[:4]) != SPECIALS:
        raise InteropError(f"CTC vocabulary must start with {SPECIALS}, got {vocab[:4]}")
    names = ["<pad>", "<s>"] + list(vocab[2:])  # transformers' CTC blank is its pad token
    letters = loaded.cfg.task.labels[:1] != ["wrd"]
    specials = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    return {
        "vocab.json": {name: i for i, name in enumerate(names)},
        "tokenizer_config.json": {"tokenizer_class": "Wav2Vec2CTCTokenizer", **specials,
                                  "word_delimiter_token": "|" if letters else "\u2581", "do_lower_case": False,
                                  "replace_word_delimiter_char": " "},
        "special_tokens_map.json": specials,
        "preprocessor_config.json": {
            "feature_extractor_type": "Wav2Vec2FeatureExtractor", "processor_class": "Wav2Vec2Processor",
            "feature_size": 1, "sampling_rate": loaded.cfg.task.sample_rate, "padding_value": 0.0,
            "padding_side": "right", "do_normalize": loaded.cfg.task.normalize,
            # group-norm extractors see the zero padding in training (fairseq, transformers): no mask
            "return_attention_mask": loaded.cfg.model.extractor_mode == "layer_norm",
        },
    }


def export_hf(loaded: Loaded, out: str | Path, force: bool = False) -> list[str]:
    """Write the transformers folder ``out``; returns the speechssl keys that have no transformers counterpart."""
    from safetensors.torch import save_file

    weights, unmapped = hf_state_dict(loaded)
    files = {"config.json": hf_config(loaded)}
    if loaded.is_ctc:
        files.update(_tokenizer_files(loaded))
    with export_dir(out, force) as tmp:
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        for name, content in files.items():
            (tmp / name).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return unmapped


# --------------------------------------------------------------------------------------------------
# Import
# --------------------------------------------------------------------------------------------------


def _read_weights(folder: Path) -> dict[str, Tensor]:
    st, bin_ = folder / "model.safetensors", folder / "pytorch_model.bin"
    if st.is_file():
        from safetensors.torch import load_file

        return load_file(str(st))
    if bin_.is_file():
        return torch.load(bin_, map_location="cpu", weights_only=True)
    if list(folder.glob("model-*-of-*.safetensors")):
        from safetensors.torch import load_file

        out: dict[str, Tensor] = {}
        for part in sorted(folder.glob("model-*-of-*.safetensors")):
            out.update(load_file(str(part)))
        return out
    raise InteropError(f"{folder}: no model.safetensors or pytorch_model.bin (a transformers save_pretrained folder)")


def _model_config(raw: dict[str, Any], folder: Path) -> ModelConfig:
    """config.json -> ModelConfig, through transformers' own config class (fills its defaults)."""
    import transformers

    model_type = raw.get("model_type")
    if model_type not in ("wav2vec2", "hubert"):
        raise InteropError(f"{folder}/config.json: model_type {model_type!r}; speechssl imports wav2vec2 and hubert")
    cls = transformers.HubertConfig if model_type == "hubert" else transformers.Wav2Vec2Config
    hf = cls.from_dict(raw)
    if hf.feat_extract_activation != "gelu":
        raise InteropError(f"{folder}: feat_extract_activation={hf.feat_extract_activation} (speechssl: gelu)")
    if getattr(hf, "layer_norm_eps", 1e-5) != 1e-5:
        raise InteropError(f"{folder}: layer_norm_eps={hf.layer_norm_eps} (speechssl uses 1e-5)")
    if model_type == "hubert":
        if not getattr(hf, "feat_proj_layer_norm", True) or getattr(hf, "conv_pos_batch_norm", False):
            raise InteropError(f"{folder}: feat_proj_layer_norm=false / conv_pos_batch_norm=true are not supported")
        d = hf.to_dict()
        d.update(proj_codevector_dim=256, num_codevectors_per_group=320, num_codevector_groups=2, codevector_dim=256,
                 num_negatives=100, contrastive_logits_temperature=0.1, feat_quantizer_dropout=0.0)
        # transformers' frame padding rule (conv output length), so that the import computes what the source did
        return dataclasses.replace(config_from_transformers(d), name="hubert", quantize_targets=False, final_dim=256,
                                   untie_final_proj=False, frame_padding="conv_length")
    if getattr(hf, "adapter_attn_dim", None) or getattr(hf, "add_adapter", False):
        raise InteropError(f"{folder}: adapters are not supported")
    return config_from_transformers(hf)


def _vocab(folder: Path, lm_rows: int, pad_id: int) -> list[str]:
    path = folder / "vocab.json"
    if not path.is_file():
        raise InteropError(f"{folder}: a CTC model needs its vocab.json (the tokenizer files)")
    table = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(table, dict) and table and all(isinstance(v, dict) for v in table.values()):
        raise InteropError(f"{path}: per-language vocabularies are not supported")
    names = [name for name, _ in sorted(table.items(), key=lambda kv: kv[1])]
    if len(names) != lm_rows or sorted(table.values()) != list(range(lm_rows)):
        raise InteropError(f"{path}: {len(names)} symbols for {lm_rows} output rows (ids must be 0..{lm_rows - 1})")
    if pad_id != 0:
        raise InteropError(f"{folder}: the CTC blank (pad_token_id) is {pad_id}; speechssl needs fairseq's layout "
                           "with the blank at index 0")
    names[0], names[1] = names[1], names[0]  # transformers' <pad> blank -> fairseq's <s>
    if tuple(names[:4]) != SPECIALS:
        raise InteropError(f"{path}: expected fairseq's special symbols <pad> <s> </s> <unk> first, got {names[:4]}")
    return names


def import_hf(folder: str | Path):
    """A transformers folder -> ``(speechssl state dict, Config, notes)``; ``notes`` lists parameters the
    source does not have (left at their fresh initialisation)."""
    from speechssl.models import build_model

    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise InteropError(f"{folder}: no config.json (expected a transformers save_pretrained folder; hub names "
                           "are not fetched: download the folder first)")
    raw = json.loads(cfg_path.read_text(encoding="utf-8"))
    model_cfg = _model_config(raw, folder)
    weights = _read_weights(folder)
    lm = {k: weights.pop(k) for k in ("lm_head.weight", "lm_head.bias") if k in weights}
    body = {(k[len("hubert."):] if k.startswith("hubert.") else k): v for k, v in weights.items()}
    try:
        state = convert_reference_state_dict(body)  # task heads other than CTC (classifier ...) are refused
    except ValueError as exc:
        raise InteropError(f"{folder}: {exc}") from None
    fresh = build_model(model_cfg).state_dict()
    notes = sorted(k for k in fresh if k not in state)
    state = {**{k: fresh[k] for k in notes}, **state}
    vocab = None
    if lm:
        vocab = _vocab(folder, lm["lm_head.weight"].shape[0], int(raw.get("pad_token_id", 0) or 0))
        drop = ("quantizer.", "project_q.", "final_proj.", "label_embs_concat")
        state = {f"w2v_model.{k}": v for k, v in state.items() if not k.startswith(drop)}
        state["proj.weight"], state["proj.bias"] = lm["lm_head.weight"], lm["lm_head.bias"]
        notes = [n for n in notes if not n.startswith(drop)]
        model_cfg = dataclasses.replace(model_cfg, quantize_targets=False,
                                        final_dropout=float(raw.get("final_dropout", 0.0) or 0.0))
    pre = {}
    pp = folder / "preprocessor_config.json"
    if pp.is_file():
        pre = json.loads(pp.read_text(encoding="utf-8"))
    config = imported_config(model_cfg, sample_rate=int(pre.get("sampling_rate", 16000)),
                             normalize=bool(pre.get("do_normalize", False)), vocab=vocab)
    return state, config, notes

