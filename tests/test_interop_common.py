"""Shared helpers of the interop tests (tiny random models, padded batches, checkpoints) and tests of
the shared checkpoint/folder handling (speechssl/interop/common.py)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from speechssl.interop.common import InteropError, export_dir, imported_config, load_speechssl, save_imported
from speechssl.models import HubertModel, Wav2Vec2Model, hubert_tiny_config, wav2vec2_tiny_config

TOL = 1e-4
# BASE layout (group-norm extractor, no conv bias, post-LN) and LARGE layout (layer-norm extractor with
# conv bias, pre-LN), tiny dims
STYLES = {"base": {}, "large": dict(extractor_mode="layer_norm", conv_bias=True, layer_norm_first=True)}
LETTERS = ["|", "E", "T", "A", "O", "N", "I", "H", "S"]
VOCAB = ["<s>", "<pad>", "</s>", "<unk>"] + LETTERS


def tiny_config(name: str = "wav2vec2", style: str = "base", **overrides):
    base = wav2vec2_tiny_config() if name == "wav2vec2" else hubert_tiny_config()
    return dataclasses.replace(base, latent_vars=8, **STYLES[style], **overrides)


def tiny_model(name: str = "wav2vec2", style: str = "base", seed: int = 0, **overrides):
    """A tiny model with random weights everywhere (norm affines too, so a wrong mapping shows)."""
    torch.manual_seed(seed)
    cfg = tiny_config(name, style, **overrides)
    model = (Wav2Vec2Model if name == "wav2vec2" else HubertModel)(cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def tiny_ctc(name: str = "wav2vec2", style: str = "base", seed: int = 0, **overrides):
    from speechssl.models.ctc import Wav2VecCtc

    upstream = tiny_model(name, style, seed, quantize_targets=False, **overrides) if name == "wav2vec2" else \
        tiny_model(name, style, seed, **overrides)
    cfg = dataclasses.replace(upstream.cfg, num_classes=[]) if name == "hubert" else upstream.cfg
    if name == "hubert":
        fresh = HubertModel(cfg)
        fresh.load_state_dict({k: v for k, v in upstream.state_dict().items() if k != "label_embs_concat"})
        upstream = fresh
    torch.manual_seed(seed + 1)
    model = Wav2VecCtc(upstream, cfg, len(VOCAB))
    with torch.no_grad():
        model.proj.weight.normal_(0, 1.0)
        model.proj.bias[4:] += 2.0  # emit letters, not only blanks, so the transcripts are not empty
        model.proj.bias[1:4] -= 20.0  # and never <pad> </s> <unk> (trained models do not)
    return model.eval(), cfg


def reference_rule(name: str) -> dict:
    """Settings for a model compared with transformers / torchaudio on padded batches: their frame padding
    rule (conv output length); speechssl's HuBERT follows fairseq's (all_samples) unless told."""
    return {"frame_padding": "conv_length"} if name == "hubert" else {}


def save_model(path: Path, model, normalize: bool = False) -> Path:
    cfg = imported_config(model.cfg, normalize=normalize)
    save_imported(path, model.state_dict(), cfg, "test", path)
    return path


def save_ctc(path: Path, model, cfg, normalize: bool = False) -> Path:
    save_imported(path, model.state_dict(), imported_config(cfg, vocab=VOCAB, normalize=normalize), "test", path)
    return path


def padded_batch(lengths=(9000, 6400, 4000), seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(lengths)
    T = int(lengths.max())
    padding_mask = torch.arange(T)[None, :] >= lengths[:, None]
    source = torch.randn(len(lengths), T, generator=g).masked_fill(padding_mask, 0.0)
    return source, padding_mask, lengths


def features(model, source, padding_mask):
    with torch.no_grad():
        return model.eval()(source, padding_mask, mask=False, features_only=True)


def max_diff(a, b, where=None) -> float:
    d = (torch.as_tensor(a) - torch.as_tensor(b)).abs()
    return (d[where] if where is not None else d).max().item()


# --------------------------------------------------------------------------------------------------


def test_save_and_load_round_trip(tmp_path, one_thread):
    model = tiny_model("wav2vec2", "large")
    ckpt = save_model(tmp_path / "m.pt", model)
    loaded = load_speechssl(ckpt)
    assert isinstance(loaded.model, Wav2Vec2Model) and not loaded.is_ctc
    assert loaded.cfg.model == model.cfg
    state = torch.load(ckpt, weights_only=True)
    assert state["imported_from"]["format"] == "test"
    with pytest.raises(InteropError, match="exists; pass --force"):
        save_model(ckpt, model)


def test_load_ctc_checkpoint(tmp_path, one_thread):
    model, cfg = tiny_ctc("hubert")
    loaded = load_speechssl(save_ctc(tmp_path / "ctc.pt", model, cfg))
    assert loaded.is_ctc and loaded.vocab == VOCAB
    source, padding_mask, _ = padded_batch()
    with torch.no_grad():
        assert max_diff(loaded.model(source, padding_mask)["logits"], model(source, padding_mask)["logits"]) == 0


def test_load_rejects_other_files(tmp_path):
    bad = tmp_path / "bad.pt"
    torch.save({"weights": torch.zeros(1)}, bad)
    with pytest.raises(InteropError, match="not a speechssl checkpoint.*speechssl import"):
        load_speechssl(bad)
    with pytest.raises(InteropError, match="no such checkpoint"):
        load_speechssl(tmp_path / "missing.pt")


def test_export_dir_is_atomic_and_refuses_overwrite(tmp_path):
    out = tmp_path / "out"
    with export_dir(out) as tmp:
        (tmp / "model.pt").write_text("1")
        assert not out.exists()
    assert (out / "model.pt").read_text() == "1"
    with pytest.raises(InteropError, match="--force"):
        with export_dir(out):
            pass
    with pytest.raises(RuntimeError):
        with export_dir(out, force=True) as tmp:
            (tmp / "config.json").write_text("2")
            raise RuntimeError("boom")
    assert sorted(p.name for p in out.iterdir()) == ["model.pt"]  # untouched after the failure
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folders left behind
    with export_dir(out, force=True) as tmp:
        (tmp / "config.json").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]

