"""transformers folders, both ways, for wav2vec 2.0 / HuBERT pretraining and CTC models, BASE and LARGE
layouts: outputs through transformers == speechssl outputs (eval mode, padded batch, valid frames)."""

from __future__ import annotations

import json

import pytest
import torch

from speechssl.cli import main
from speechssl.decode.greedy import greedy_decode
from speechssl.interop.common import load_speechssl
from speechssl.text.vocab import Vocabulary

from test_interop_common import (
    STYLES, TOL, VOCAB, features, max_diff, padded_batch, reference_rule, save_ctc, save_model, tiny_ctc,
    tiny_model,
)

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")
pytestmark = pytest.mark.usefixtures("one_thread")


def hf_hidden(hf_model, source, padding_mask):
    """Outputs of transformers' base model (Wav2Vec2Model / HubertModel) inside ``hf_model``."""
    base = getattr(hf_model, "wav2vec2", None) or getattr(hf_model, "hubert", None) or hf_model
    with torch.no_grad():
        return base.eval()(source, attention_mask=(~padding_mask).long(), output_hidden_states=True)


def assert_layers_match(ours, hf_out, valid, n_layers):
    # transformers' hidden_states = (input of layer 1, output of layer 1, ..., output of the last layer)
    assert len(hf_out.hidden_states) == n_layers + 1
    for mine, theirs in zip(ours["layer_results"], hf_out.hidden_states[1:]):
        assert max_diff(mine, theirs, valid) < TOL
    assert max_diff(ours["x"], hf_out.last_hidden_state, valid) < TOL


@pytest.mark.parametrize("style", sorted(STYLES))
def test_export_wav2vec2_pretraining(tmp_path, style):
    model = tiny_model("wav2vec2", style)
    ckpt = save_model(tmp_path / "m.pt", model)
    out = tmp_path / "hf"
    assert main(["export", str(ckpt), "--to", "hf", "--out", str(out)]) == 0
    assert (out / "model.safetensors").is_file() and json.loads((out / "config.json").read_text())[
        "architectures"] == ["Wav2Vec2ForPreTraining"]
    hf, info = transformers.Wav2Vec2ForPreTraining.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    source, padding_mask, _ = padded_batch()
    ours = features(model, source, padding_mask)
    valid = ~ours["padding_mask"]
    hf_out = hf_hidden(hf.eval(), source, padding_mask)
    assert_layers_match(ours, hf_out, valid, model.cfg.encoder_layers)
    # pretraining heads: same quantized targets and context projections
    with torch.no_grad():
        q = model.quantizer(ours["features"])["x"]
        hf_q, _ = hf.quantizer(hf.wav2vec2.feature_projection(hf.wav2vec2.feature_extractor(source).transpose(1, 2))[1])
        assert max_diff(model.project_q(q), hf.project_q(hf_q), valid) < TOL
        assert max_diff(model.final_proj(ours["x"]), hf.project_hid(hf_out.last_hidden_state), valid) < TOL
    assert main(["export", str(ckpt), "--to", "hf", "--out", str(out)]) == 1  # exists
    assert main(["export", str(ckpt), "--to", "hf", "--out", str(out), "--force"]) == 0


@pytest.mark.parametrize("style", sorted(STYLES))
def test_import_wav2vec2_pretraining(tmp_path, style):
    from speechssl.models.weights import transformers_config_kwargs

    cfg = tiny_model("wav2vec2", style).cfg
    torch.manual_seed(1)
    hf = transformers.Wav2Vec2ForPreTraining(transformers.Wav2Vec2Config(**transformers_config_kwargs(cfg))).eval()
    hf.save_pretrained(tmp_path / "hf")
    out = tmp_path / "imported.pt"
    assert main(["import", str(tmp_path / "hf"), "--from", "hf", "--out", str(out)]) == 0
    loaded = load_speechssl(out)
    source, padding_mask, _ = padded_batch(seed=1)
    ours = features(loaded.model, source, padding_mask)
    assert_layers_match(ours, hf_hidden(hf, source, padding_mask), ~ours["padding_mask"], cfg.encoder_layers)
    assert torch.equal(loaded.model.quantizer.vars, hf.quantizer.codevectors)


def test_import_encoder_only_folder(tmp_path, capsys):
    """A transformers Wav2Vec2Model folder has no pretraining heads: they are initialised and listed."""
    from speechssl.models.weights import transformers_config_kwargs

    cfg = tiny_model("wav2vec2", "base").cfg
    hf = transformers.Wav2Vec2Model(transformers.Wav2Vec2Config(**transformers_config_kwargs(cfg))).eval()
    hf.save_pretrained(tmp_path / "hf")
    out = tmp_path / "imported.pt"
    assert main(["import", str(tmp_path / "hf"), "--from", "hf", "--out", str(out)]) == 0
    assert "freshly initialised: final_proj.bias" in capsys.readouterr().out
    source, padding_mask, _ = padded_batch()
    ours = features(load_speechssl(out).model, source, padding_mask)
    assert_layers_match(ours, hf_hidden(hf, source, padding_mask), ~ours["padding_mask"], cfg.encoder_layers)


@pytest.mark.parametrize("style", sorted(STYLES))
def test_hubert_both_ways(tmp_path, style):
    model = tiny_model("hubert", style, **reference_rule("hubert"))
    ckpt = save_model(tmp_path / "h.pt", model)
    out = tmp_path / "hf"
    assert main(["export", str(ckpt), "--to", "hf", "--out", str(out)]) == 0
    hf, info = transformers.HubertModel.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    source, padding_mask, _ = padded_batch()
    ours = features(model, source, padding_mask)
    assert_layers_match(ours, hf_hidden(hf.eval(), source, padding_mask), ~ours["padding_mask"],
                        model.cfg.encoder_layers)
    back = tmp_path / "back.pt"
    assert main(["import", str(out), "--from", "hf", "--out", str(back)]) == 0
    loaded = load_speechssl(back)
    assert loaded.cfg.model.name == "hubert" and loaded.cfg.model.layer_norm_first == (style == "large")
    assert loaded.cfg.model.frame_padding == "conv_length"  # transformers' rule: the import computes what it did
    assert max_diff(features(loaded.model, source, padding_mask)["x"], ours["x"], ~ours["padding_mask"]) == 0


@pytest.mark.parametrize("name,style", [("wav2vec2", "base"), ("hubert", "large")])
def test_ctc_export_transcribes_the_same_text(tmp_path, name, style):
    ctc, cfg = tiny_ctc(name, style, **reference_rule(name))
    ckpt = save_ctc(tmp_path / "ctc.pt", ctc, cfg)
    out = tmp_path / "hf_ctc"
    assert main(["export", str(ckpt), "--to", "hf", "--out", str(out)]) == 0
    cls = transformers.HubertForCTC if name == "hubert" else transformers.Wav2Vec2ForCTC
    hf, info = cls.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    processor = transformers.Wav2Vec2Processor.from_pretrained(out)
    source, padding_mask, lengths = padded_batch()
    with torch.no_grad():
        ours = ctc(source, padding_mask)
        inputs = processor([s[:n].numpy() for s, n in zip(source, lengths)], sampling_rate=16000,
                           return_tensors="pt", padding=True, return_attention_mask=True)
        assert torch.equal(inputs.input_values, source)  # do_normalize false: the same waveforms
        logits = hf.eval()(inputs.input_values, attention_mask=inputs.attention_mask).logits
    valid = ~ours["padding_mask"]
    assert max_diff(ours["logits"], logits, valid) < TOL
    vocab = Vocabulary(VOCAB, "letter")
    ours_text = [vocab.decode(ids) for ids in greedy_decode(ours["logits"], ours["lengths"])]
    ids = logits.argmax(-1).masked_fill(~valid, processor.tokenizer.pad_token_id)
    hf_text = processor.batch_decode(ids)
    assert hf_text == ours_text
    assert all(t.strip() for t in ours_text)  # not trivially empty

    back = tmp_path / "back.pt"
    assert main(["import", str(out), "--from", "hf", "--out", str(back)]) == 0
    loaded = load_speechssl(back)
    assert loaded.is_ctc and loaded.vocab == VOCAB and loaded.cfg.model.name == name
    with torch.no_grad():
        assert max_diff(loaded.model(source, padding_mask)["logits"], ours["logits"], valid) == 0


def test_import_errors(tmp_path):
    assert main(["import", str(tmp_path / "nothing"), "--from", "hf", "--out", str(tmp_path / "o.pt")]) == 1
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    from speechssl.interop.common import InteropError
    from speechssl.interop.hf import import_hf

    with pytest.raises(InteropError, match="model_type 'bert'"):
        import_hf(tmp_path / "d")


def test_model_without_feature_projection_round_trips_through_transformers(tmp_path):
    """conv channels == encoder width: speechssl (as fairseq) has no feature projection, transformers always
    has one; export writes an identity, import drops it again, and a learned one is refused."""
    wide = [(48, 10, 5)] + [(48, 3, 2)] * 4 + [(48, 2, 2)] * 2
    model = tiny_model("wav2vec2", "large", conv_feature_layers=wide)
    assert model.feature_projection.projection is None
    ckpt = save_model(tmp_path / "m.pt", model)
    assert main(["export", str(ckpt), "--to", "hf", "--out", str(tmp_path / "hf")]) == 0
    hf = transformers.Wav2Vec2ForPreTraining.from_pretrained(tmp_path / "hf").eval()
    assert torch.equal(hf.wav2vec2.feature_projection.projection.weight, torch.eye(48))
    source, padding_mask, _ = padded_batch()
    ours = features(model, source, padding_mask)
    assert_layers_match(ours, hf_hidden(hf, source, padding_mask), ~ours["padding_mask"], model.cfg.encoder_layers)
    assert main(["import", str(tmp_path / "hf"), "--from", "hf", "--out", str(tmp_path / "back.pt")]) == 0
    back = load_speechssl(tmp_path / "back.pt").model
    assert back.feature_projection.projection is None
    assert max_diff(features(back, source, padding_mask)["x"], ours["x"]) == 0
    with torch.no_grad():
        hf.wav2vec2.feature_projection.projection.weight.add_(0.01)
    hf.save_pretrained(tmp_path / "learned")
    assert main(["import", str(tmp_path / "learned"), "--from", "hf", "--out", str(tmp_path / "x.pt")]) == 1


TUTORIAL_LETTERS = list("abcdefghijklmnopqrstuvwxyz'")


def tutorial_ctc_folder(folder, style="base"):
    """A tiny random Wav2Vec2ForCTC saved with a processor in the layout of transformers' fine-tuning tutorial:
    vocab.json = letters, ', | (27), [UNK] (28), [PAD] (29, the CTC blank); the tokenizer adds <s> </s> (30, 31)
    and the model has vocab_size len(tokenizer) = 32."""
    from speechssl.models.weights import transformers_config_kwargs

    from test_interop_common import tiny_config

    folder.mkdir()
    vocab = {c: i for i, c in enumerate(TUTORIAL_LETTERS)}
    vocab.update({"|": 27, "[UNK]": 28, "[PAD]": 29})
    (folder / "vocab.json").write_text(json.dumps(vocab))
    tokenizer = transformers.Wav2Vec2CTCTokenizer(str(folder / "vocab.json"), unk_token="[UNK]", pad_token="[PAD]",
                                                  word_delimiter_token="|")
    extractor = transformers.Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0,
                                                      do_normalize=False, return_attention_mask=True)
    processor = transformers.Wav2Vec2Processor(feature_extractor=extractor, tokenizer=tokenizer)
    assert len(tokenizer) == 32 and tokenizer.pad_token_id == 29
    config = transformers.Wav2Vec2Config(**transformers_config_kwargs(tiny_config("wav2vec2", style)),
                                         vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                         ctc_loss_reduction="mean")
    torch.manual_seed(0)
    model = transformers.Wav2Vec2ForCTC(config).eval()
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 1.0)
        model.lm_head.bias[:28] += 2.0  # emit letters and | ...
        model.lm_head.bias[27] += 8.0  # word boundaries too
        model.lm_head.bias[28] -= 20.0  # ... and never [UNK], <s>, </s> (trained models do not)
        model.lm_head.bias[30:] -= 20.0
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return model, processor


def hf_transcripts(model, processor, source, lengths):
    inputs = processor([s[:n].numpy() for s, n in zip(source, lengths)], sampling_rate=16000, return_tensors="pt",
                       padding=True, return_attention_mask=True)
    with torch.no_grad():
        logits = model(inputs.input_values, attention_mask=inputs.attention_mask).logits
    valid_frames = model._get_feat_extract_output_lengths(lengths)
    ids = logits.argmax(-1).masked_fill(torch.arange(logits.shape[1])[None] >= valid_frames[:, None],
                                        processor.tokenizer.pad_token_id)
    return logits, processor.batch_decode(ids)


def test_ctc_vocabulary_in_the_transformers_tutorial_layout_both_ways(tmp_path):
    """Blank ([PAD]) at id 29: import moves its output row first, keeps the token strings, decodes with them as
    transformers does, and export writes the original layout back exactly."""
    original, processor = tutorial_ctc_folder(tmp_path / "tutorial")
    out = tmp_path / "imported.pt"
    assert main(["import", str(tmp_path / "tutorial"), "--from", "hf", "--out", str(out)]) == 0
    loaded = load_speechssl(out)
    task = loaded.cfg.task
    names = [processor.tokenizer.convert_ids_to_tokens(i) for i in range(32)]
    assert loaded.vocab == ["[PAD]"] + names[:29] + ["<s>", "</s>"]
    assert task.vocab_specials == ["[PAD]", "[UNK]", "<s>", "</s>"] and task.vocab_blank_id == 29
    rows = [29] + list(range(29)) + [30, 31]
    assert torch.equal(loaded.model.proj.weight, original.lm_head.weight[rows])
    assert torch.equal(loaded.model.proj.bias, original.lm_head.bias[rows])

    source, padding_mask, lengths = padded_batch()
    theirs, hf_text = hf_transcripts(original, processor, source, lengths)
    with torch.no_grad():
        ours = loaded.model(source, padding_mask)
    valid = ~ours["padding_mask"]
    assert max_diff(ours["logits"], theirs[..., rows], valid) < TOL
    ours_text = [Vocabulary.for_task(task).decode(ids) for ids in greedy_decode(ours["logits"], ours["lengths"])]
    assert ours_text == hf_text and all(t.strip() for t in ours_text)
    assert any(" " in t.strip() for t in ours_text), ours_text  # | decodes as the word boundary

    back = tmp_path / "back"
    assert main(["export", str(out), "--to", "hf", "--out", str(back)]) == 0
    exported = transformers.Wav2Vec2ForCTC.from_pretrained(back).eval()
    back_processor = transformers.Wav2Vec2Processor.from_pretrained(back)
    assert back_processor.tokenizer.get_vocab() == processor.tokenizer.get_vocab()  # every token at its id
    assert (back_processor.tokenizer.pad_token, back_processor.tokenizer.unk_token) == ("[PAD]", "[UNK]")
    assert exported.config.pad_token_id == 29 and exported.config.vocab_size == 32
    assert torch.equal(exported.lm_head.weight, original.lm_head.weight)
    assert torch.equal(exported.lm_head.bias, original.lm_head.bias)
    logits, text = hf_transcripts(exported, back_processor, source, lengths)
    assert max_diff(logits, theirs, valid) < TOL and text == hf_text
    # and in again: the same model
    assert main(["import", str(back), "--from", "hf", "--out", str(tmp_path / "again.pt")]) == 0
    again = load_speechssl(tmp_path / "again.pt")
    assert again.vocab == loaded.vocab and again.cfg.task.vocab_specials == task.vocab_specials
    assert torch.equal(again.model.proj.weight, loaded.model.proj.weight)
    # a torchaudio folder (labels blank first) keeps the tokenizer's specials too
    assert main(["export", str(out), "--to", "torchaudio", "--out", str(tmp_path / "ta")]) == 0
    assert main(["import", str(tmp_path / "ta"), "--from", "torchaudio", "--out", str(tmp_path / "ta.pt")]) == 0
    ta = load_speechssl(tmp_path / "ta.pt").cfg.task
    assert (ta.vocab, ta.vocab_specials, ta.vocab_blank_id) == (loaded.vocab, task.vocab_specials, 29)


def test_ctc_vocabulary_errors(tmp_path):
    from speechssl.interop.common import InteropError
    from speechssl.interop.hf import import_hf

    tutorial_ctc_folder(tmp_path / "t")
    config = json.loads((tmp_path / "t" / "config.json").read_text())
    (tmp_path / "t" / "config.json").write_text(json.dumps({**config, "pad_token_id": 28}))
    with pytest.raises(InteropError, match=r"pad_token_id 28, is '\[UNK\]' but the tokenizer's pad token is '\[PAD\]'"):
        import_hf(tmp_path / "t")
    (tmp_path / "t" / "config.json").write_text(json.dumps(config))
    # the added <s> </s> (ids 30, 31) are output rows too: without the tokenizer's added tokens they have no name
    (tmp_path / "t" / "added_tokens.json").unlink(missing_ok=True)
    tok_config = json.loads((tmp_path / "t" / "tokenizer_config.json").read_text())
    tok_config["added_tokens_decoder"] = {k: v for k, v in tok_config.get("added_tokens_decoder", {}).items()
                                          if int(k) < 30}
    (tmp_path / "t" / "tokenizer_config.json").write_text(json.dumps(tok_config))
    with pytest.raises(InteropError, match=r"no token for output ids \[30, 31\]"):
        import_hf(tmp_path / "t")
