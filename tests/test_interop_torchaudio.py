"""torchaudio folders both ways: speechssl -> export -> torchaudio.models.wav2vec2_model outputs ==
speechssl outputs, and back (BASE / LARGE layouts, wav2vec 2.0 / HuBERT, CTC head as ``aux``)."""

from __future__ import annotations

import json

import pytest
import torch

from speechssl.cli import main
from speechssl.interop.common import load_speechssl

from test_interop_common import (
    TOL, VOCAB, features, max_diff, padded_batch, reference_rule, save_ctc, save_model, tiny_ctc, tiny_model,
)

torchaudio = pytest.importorskip("torchaudio")
pytestmark = pytest.mark.usefixtures("one_thread")


def load_torchaudio(folder):
    meta = json.loads((folder / "config.json").read_text())
    model = torchaudio.models.wav2vec2_model(**meta["kwargs"])
    model.load_state_dict(torch.load(folder / "model.pt", weights_only=True))
    return model.eval(), meta


@pytest.mark.parametrize("name,style", [("wav2vec2", "base"), ("wav2vec2", "large"), ("hubert", "large")])
def test_pretraining_model_both_ways(tmp_path, name, style):
    model = tiny_model(name, style, **reference_rule(name))
    ckpt = save_model(tmp_path / "m.pt", model)
    out = tmp_path / "ta"
    assert main(["export", str(ckpt), "--to", "torchaudio", "--out", str(out)]) == 0
    ta, meta = load_torchaudio(out)
    assert meta["model_name"] == name
    source, padding_mask, lengths = padded_batch()
    ours = features(model, source, padding_mask)
    valid = ~ours["padding_mask"]
    with torch.no_grad():
        layers, _ = ta.extract_features(source, lengths)
        final, frame_lengths = ta(source, lengths)
    assert torch.equal(frame_lengths, valid.sum(1))
    for mine, theirs in zip(ours["layer_results"], layers):
        assert max_diff(mine, theirs, valid) < TOL
    assert max_diff(ours["x"], final, valid) < TOL

    back = tmp_path / "back.pt"
    assert main(["import", str(out), "--from", "torchaudio", "--out", str(back)]) == 0
    loaded = load_speechssl(back)
    assert loaded.cfg.model.name == name and loaded.cfg.model.layer_norm_first == (style == "large")
    assert loaded.cfg.model.frame_padding == ("conv_length" if name == "hubert" else "auto")
    for key, value in model.state_dict().items():
        if not key.startswith(("mask_emb", "quantizer", "project_q", "final_proj", "label_embs")):
            assert torch.equal(loaded.model.state_dict()[key], value), key


def test_ctc_head_as_aux(tmp_path):
    ctc, cfg = tiny_ctc("wav2vec2", "large")
    ckpt = save_ctc(tmp_path / "ctc.pt", ctc, cfg)
    out = tmp_path / "ta"
    assert main(["export", str(ckpt), "--to", "torchaudio", "--out", str(out)]) == 0
    ta, meta = load_torchaudio(out)
    assert meta["labels"] == VOCAB
    source, padding_mask, lengths = padded_batch()
    with torch.no_grad():
        ours = ctc(source, padding_mask)
        logits, _ = ta(source, lengths)
    valid = ~ours["padding_mask"]
    assert max_diff(ours["logits"], logits, valid) < TOL
    back = tmp_path / "back.pt"
    assert main(["import", str(out), "--from", "torchaudio", "--out", str(back)]) == 0
    loaded = load_speechssl(back)
    assert loaded.is_ctc and loaded.vocab == VOCAB
    with torch.no_grad():
        assert max_diff(loaded.model(source, padding_mask)["logits"], ours["logits"], valid) == 0


def test_import_rejects_other_folders(tmp_path):
    (tmp_path / "x").mkdir()
    assert main(["import", str(tmp_path / "x"), "--from", "torchaudio", "--out", str(tmp_path / "o.pt")]) == 1
    assert not (tmp_path / "o.pt").exists()
