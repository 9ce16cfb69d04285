"""Hugging Face transformers folders: export speechssl models to them and import them (local folders only).

Export writes ``config.json`` + ``model.safetensors`` that transformers loads with::

    wav2vec 2.0 pretraining  -> Wav2Vec2ForPreTraining   (quantizer, project_q, project_hid included)
    HuBERT pretraining       -> HubertModel              (final_proj / label embeddings: no counterpart, left out)
    data2vec pretraining     -> Data2VecAudioModel       (the student encoder, without ALiBi only: transformers'
                                                          data2vec audio is the data2vec 1.0 encoder; decoder
                                                          and teacher left out)
    CTC (wav2vec 2.0/HuBERT/ -> Wav2Vec2ForCTC / HubertForCTC / Data2VecAudioForCTC, plus vocab.json, tokenizer_config.json,
         data2vec)
                                special_tokens_map.json and preprocessor_config.json, so that
                                ``Wav2Vec2Processor.from_pretrained(DIR)`` decodes the model's output

Parameter names: :mod:`speechssl.interop.names` (and :mod:`speechssl.models.weights` for the other
way; data2vec's differences: :mod:`speechssl.interop.data2vec`).

CTC vocabularies. speechssl's own are fairseq's (``<s> <pad> </s> <unk> ...``, blank = index 0);
transformers' CTC blank is its tokenizer's pad token (``pad_token_id``), so the first two names are
swapped in ``vocab.json`` (index 0 ``<pad>``, index 1 ``<s>``), exactly as the converted fairseq models on
the Hub have them; import swaps them back. Any other layout, e.g. transformers' fine-tuning tutorial
(letters, ``|``, ``[UNK]``, ``[PAD]`` = blank, then the added ``<s>`` ``</s>``), is imported as it is:
the output rows are reordered so that the blank comes first and the others keep their order, the token
strings are kept, the tokenizer's ``[pad, unk, bos, eos]`` go to ``task.vocab_specials`` (decoding drops
them) and the blank's id to ``task.vocab_blank_id``; export writes the original ids and row order back.
The token table is ``vocab.json`` plus the tokenizer's added tokens (``added_tokens.json``,
``tokenizer_config.json``'s ``added_tokens_decoder``); ids at or past the output layer's size are not
outputs and are left out.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from speechssl.config import ModelConfig
from speechssl.interop import data2vec
from speechssl.interop.common import InteropError, Loaded, export_dir, imported_config
from speechssl.interop.names import PRETRAINING_HEADS, upstream_to_reference
from speechssl.models.weights import config_from_transformers, convert_reference_state_dict, transformers_config_kwargs

_QUANTIZER_KEYS = ("proj_codevector_dim", "num_codevectors_per_group", "num_codevector_groups", "codevector_dim",
                   "num_negatives", "contrastive_logits_temperature", "feat_quantizer_dropout")
SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")


def hf_config(loaded: Loaded) -> dict[str, Any]:
    """The ``config.json`` content for ``loaded``'s model."""
    cfg = loaded.cfg.model
    hubert, d2v = cfg.name == "hubert", cfg.name == "data2vec2"
    kwargs = data2vec.transformers_config_kwargs(cfg) if d2v else transformers_config_kwargs(cfg)
    model_type = "hubert" if hubert else "data2vec-audio" if d2v else "wav2vec2"
    if hubert:
        kwargs = {k: v for k, v in kwargs.items() if k not in _QUANTIZER_KEYS}
        kwargs.update(feat_proj_layer_norm=True, conv_pos_batch_norm=False)
    if loaded.is_ctc:
        arch = "HubertForCTC" if hubert else "Data2VecAudioForCTC" if d2v else "Wav2Vec2ForCTC"
        layout = hf_vocab_layout(loaded)
        ids = {name: i for i, name in enumerate(layout.names)}
        kwargs.update(vocab_size=len(layout.names), pad_token_id=ids[layout.pad],
                      bos_token_id=ids.get(layout.bos, 1), eos_token_id=ids.get(layout.eos, 2),
                      ctc_loss_reduction="sum", ctc_zero_infinity=True, final_dropout=cfg.final_dropout)
    elif hubert:
        arch = "HubertModel"
    elif d2v:
        arch = "Data2VecAudioModel"
    else:
        arch = "Wav2Vec2ForPreTraining" if cfg.quantize_targets else "Wav2Vec2Model"
    return {"architectures": [arch], "model_type": model_type, **kwargs}


_PREFIX = {"hubert": "hubert.", "data2vec2": "data2vec_audio.", "wav2vec2": "wav2vec2."}
_D2V_PRETRAINING = ("decoder.", "teacher.")  # data2vec 2.0's pretraining modules: no transformers counterpart


def hf_state_dict(loaded: Loaded) -> tuple[dict[str, Tensor], list[str]]:
    """transformers weights for ``loaded`` and the speechssl keys left out."""
    cfg = loaded.cfg.model
    upstream = loaded.upstream.state_dict()
    heads = {k: v for k, v in upstream.items()
             if k in PRETRAINING_HEADS or k == "label_embs_concat" or k.startswith(_D2V_PRETRAINING)}
    body, unmapped = upstream_to_reference({k: v for k, v in upstream.items() if k not in heads}, "transformers")
    prefix = _PREFIX[cfg.name]
    arch = hf_config(loaded)["architectures"][0]
    if arch in ("HubertModel", "Wav2Vec2Model", "Data2VecAudioModel"):
        out = dict(body)
        unmapped += sorted(heads)
    else:
        out = {prefix + k: v for k, v in body.items()}
        if arch == "Wav2Vec2ForPreTraining":
            out.update({PRETRAINING_HEADS[k]: v for k, v in heads.items()})
        if loaded.is_ctc:
            rows = torch.tensor(hf_vocab_layout(loaded).rows)  # output row of each transformers id
            proj = loaded.model.proj
            out["lm_head.weight"], out["lm_head.bias"] = proj.weight.detach()[rows], proj.bias.detach()[rows]
    return {k: v.detach().contiguous().clone() for k, v in out.items()}, unmapped


@dataclasses.dataclass
class HfVocabLayout:
    """A CTC vocabulary as transformers holds it: ``names[i]`` is the token of id ``i``, ``rows[i]`` the
    speechssl output row of id ``i``; ``pad`` (= the CTC blank), ``unk``, ``bos``, ``eos`` the tokenizer's."""

    names: list[str]
    rows: list[int]
    pad: str
    unk: str
    bos: str
    eos: str


def hf_vocab_layout(loaded: Loaded) -> HfVocabLayout:
    """The transformers layout of ``loaded``'s vocabulary (see the module docstring)."""
    task = loaded.cfg.task
    vocab = loaded.vocab
    if not task.vocab_specials:  # fairseq's order: the blank <s> and <pad> swap names
        if tuple(vocab[:4]) != SPECIALS:
            raise InteropError(f"CTC vocabulary must start with {SPECIALS}, got {vocab[:4]}")
        names = ["<pad>", "<s>"] + list(vocab[2:])
        return HfVocabLayout(names, list(range(len(vocab))), "<pad>", "<unk>", "<s>", "</s>")
    blank = task.vocab_blank_id
    if not 0 <= blank < len(vocab):
        raise InteropError(f"task.vocab_blank_id={blank} is outside the vocabulary of {len(vocab)} symbols")
    rows = list(range(1, blank + 1)) + [0] + list(range(blank + 1, len(vocab)))  # undo the blank-first order
    pad, unk, bos, eos = task.vocab_specials
    return HfVocabLayout([vocab[r] for r in rows], rows, pad, unk, bos, eos)


def _tokenizer_files(loaded: Loaded) -> dict[str, Any]:
    layout = hf_vocab_layout(loaded)
    letters = loaded.cfg.task.labels[:1] != ["wrd"]
    specials = {"bos_token": layout.bos, "eos_token": layout.eos, "unk_token": layout.unk, "pad_token": layout.pad}
    return {
        "vocab.json": {name: i for i, name in enumerate(layout.names)},
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
    if model_type not in ("wav2vec2", "hubert", "data2vec-audio"):
        raise InteropError(f"{folder}/config.json: model_type {model_type!r}; speechssl imports wav2vec2, hubert and "
                           "data2vec-audio")
    cls = {"hubert": transformers.HubertConfig, "data2vec-audio": transformers.Data2VecAudioConfig}.get(
        model_type, transformers.Wav2Vec2Config)
    hf = cls.from_dict(raw)
    if hf.feat_extract_activation != "gelu":
        raise InteropError(f"{folder}: feat_extract_activation={hf.feat_extract_activation} (speechssl: gelu)")
    if getattr(hf, "layer_norm_eps", 1e-5) != 1e-5:
        raise InteropError(f"{folder}: layer_norm_eps={hf.layer_norm_eps} (speechssl uses 1e-5)")
    if getattr(hf, "add_adapter", False) or getattr(hf, "adapter_attn_dim", None):
        raise InteropError(f"{folder}: adapters are not supported")
    if model_type == "data2vec-audio":
        return data2vec.config_from_transformers(hf)
    if model_type == "hubert":
        if not getattr(hf, "feat_proj_layer_norm", True) or getattr(hf, "conv_pos_batch_norm", False):
            raise InteropError(f"{folder}: feat_proj_layer_norm=false / conv_pos_batch_norm=true are not supported")
        d = hf.to_dict()
        d.update(proj_codevector_dim=256, num_codevectors_per_group=320, num_codevector_groups=2, codevector_dim=256,
                 num_negatives=100, contrastive_logits_temperature=0.1, feat_quantizer_dropout=0.0)
        # transformers' frame padding rule (conv output length), so that the import computes what the source did
        return dataclasses.replace(config_from_transformers(d), name="hubert", quantize_targets=False, final_dim=256,
                                   untie_final_proj=False, frame_padding="conv_length")
    return config_from_transformers(hf)


# Wav2Vec2CTCTokenizer's defaults for the tokens a tokenizer_config.json leaves out
_TOKENIZER_DEFAULTS = {"pad_token": "<pad>", "unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>",
                       "word_delimiter_token": "|"}


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InteropError(f"{path}: not readable JSON ({exc})") from None


def _token_table(folder: Path, lm_rows: int) -> list[str]:
    """Token of every output id ``0 .. lm_rows - 1``: ``vocab.json`` plus the tokenizer's added tokens."""
    path = folder / "vocab.json"
    if not path.is_file():
        raise InteropError(f"{folder}: a CTC model needs its vocab.json (the tokenizer files)")
    table = _read_json(path)
    if not isinstance(table, dict) or not table:
        raise InteropError(f"{path}: expected a JSON object of token -> id")
    if all(isinstance(v, dict) for v in table.values()):
        raise InteropError(f"{path}: per-language vocabularies are not supported")
    entries = [(int(i), str(t), path.name) for t, i in table.items()]
    added = folder / "added_tokens.json"
    if added.is_file():
        entries += [(int(i), str(t), added.name) for t, i in _read_json(added).items()]
    config = folder / "tokenizer_config.json"
    if config.is_file():
        decoder = _read_json(config).get("added_tokens_decoder") or {}
        entries += [(int(i), str(v["content"] if isinstance(v, dict) else v), config.name) for i, v in decoder.items()]
    by_id: dict[int, str] = {}
    for i, token, where in entries:
        if by_id.setdefault(i, token) != token:
            raise InteropError(f"{folder}: id {i} is '{by_id[i]}' in one tokenizer file and '{token}' in {where}")
    names = [by_id.get(i) for i in range(lm_rows)]  # ids >= lm_rows (e.g. added tokens) are no outputs
    missing = [i for i, n in enumerate(names) if n is None]
    if missing:
        raise InteropError(f"{path}: no token for output ids {missing[:8]} of the {lm_rows} output rows (vocab.json "
                           "and the added tokens must cover 0..vocab_size-1)")
    if len(set(names)) != len(names):
        raise InteropError(f"{path}: a token has two ids")
    return names


def _tokenizer_tokens(folder: Path) -> dict[str, str]:
    """pad / unk / bos / eos / word delimiter of the folder's tokenizer (Wav2Vec2CTCTokenizer's defaults)."""
    found: dict[str, Any] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins
        if (folder / name).is_file():
            found.update({k: v for k, v in _read_json(folder / name).items() if k in _TOKENIZER_DEFAULTS and v})
    out = {}
    for key, default in _TOKENIZER_DEFAULTS.items():
        value = found.get(key, default)
        out[key] = str(value["content"] if isinstance(value, dict) else value)  # AddedToken dicts: their text
    return out


def _vocab(folder: Path, lm_rows: int, pad_id: int) -> tuple[list[str], list[int], list[str]]:
    """``(symbols in speechssl's order, the output row of each, vocab_specials)``: fairseq's layout as it is
    (the blank <pad> renamed <s>, specials empty), any other with the blank moved first (module docstring)."""
    names = _token_table(folder, lm_rows)
    if not 0 <= pad_id < lm_rows:
        raise InteropError(f"{folder}/config.json: pad_token_id (the CTC blank) {pad_id} is not an output id "
                           f"(vocab_size {lm_rows})")
    tokens = _tokenizer_tokens(folder)
    if names[pad_id] != tokens["pad_token"]:
        raise InteropError(f"{folder}: the CTC blank, config.json's pad_token_id {pad_id}, is '{names[pad_id]}' but "
                           f"the tokenizer's pad token is '{tokens['pad_token']}'; they must be the same token")
    if pad_id == 0 and tuple(names[:4]) == ("<pad>", "<s>", "</s>", "<unk>"):  # fairseq's, as speechssl exports
        return ["<s>", "<pad>"] + names[2:], list(range(lm_rows)), []
    pieces = any(n.startswith("\u2581") for n in names)
    if not pieces and tokens["word_delimiter_token"] != "|":
        raise InteropError(f"{folder}: word_delimiter_token '{tokens['word_delimiter_token']}'; speechssl decodes "
                           "letter vocabularies with '|' between words")
    rows = [pad_id] + [i for i in range(lm_rows) if i != pad_id]
    specials = [tokens[k] for k in ("pad_token", "unk_token", "bos_token", "eos_token")]
    return [names[i] for i in rows], rows, specials


def import_hf(folder: str | Path):
    """A transformers folder -> ``(speechssl state dict, Config, notes)``; ``notes`` lists parameters the
    source does not have (left at their fresh initialisation)."""
    from speechssl.models import build_model

    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise InteropError(f"{folder}: no config.json (expected a transformers save_pretrained folder; hub names "
                           "are not fetched: download the folder first)")
    try:
        raw = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InteropError(f"{cfg_path}: not a transformers config (JSON): {exc}") from None
    model_cfg = _model_config(raw, folder)
    weights = _read_weights(folder)
    lm = {k: weights.pop(k) for k in ("lm_head.weight", "lm_head.bias") if k in weights}
    d2v = model_cfg.name == "data2vec2"
    body = {(k[len("hubert."):] if k.startswith("hubert.") else k): v for k, v in weights.items()
            if not (d2v and k.endswith("masked_spec_embed"))}  # data2vec: masks with noise (module docstring)
    try:  # task heads other than CTC (classifier ...) are refused
        state = convert_reference_state_dict(body, keep_projection=d2v)
    except ValueError as exc:
        raise InteropError(f"{folder}: {exc}") from None
    fresh = build_model(model_cfg).state_dict()
    if d2v:  # the teacher starts as a copy of the encoder, as in a fresh run
        state = data2vec.with_teacher_from_encoder(state)
    notes = sorted(k for k in fresh if k not in state)
    state = {**{k: fresh[k] for k in notes}, **state}
    vocab, specials, pad_id = None, [], 0
    if lm:
        pad_id = int(raw.get("pad_token_id", 0) or 0)
        vocab, rows, specials = _vocab(folder, lm["lm_head.weight"].shape[0], pad_id)
        drop = ("quantizer.", "project_q.", "final_proj.", "label_embs_concat", *_D2V_PRETRAINING)
        state = {f"w2v_model.{k}": v for k, v in state.items() if not k.startswith(drop)}
        index = torch.tensor(rows)  # blank first: speechssl's CTC layout
        state["proj.weight"], state["proj.bias"] = lm["lm_head.weight"][index], lm["lm_head.bias"][index]
        notes = [n for n in notes if not n.startswith(drop)]
        model_cfg = dataclasses.replace(model_cfg, quantize_targets=False,
                                        final_dropout=float(raw.get("final_dropout", 0.0) or 0.0))
    pre = {}
    pp = folder / "preprocessor_config.json"
    if pp.is_file():
        pre = json.loads(pp.read_text(encoding="utf-8"))
    config = imported_config(model_cfg, sample_rate=int(pre.get("sampling_rate", 16000)),
                             normalize=bool(pre.get("do_normalize", False)), vocab=vocab, vocab_specials=specials,
                             vocab_blank_id=pad_id if specials else 0)
    return state, config, notes

