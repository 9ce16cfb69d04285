"""Foreign files where a speechssl checkpoint is expected, 'import' of files that are not what --from says,
and 'export --force' (only an earlier export is replaced; folders and files get the user's umask)."""

from __future__ import annotations

import argparse
import json
import os
import stat

import numpy as np
import pytest
import soundfile as sf
import torch

from speechssl.cli import main
from speechssl.interop.identify import identify, not_a_checkpoint_message
from test_interop_common import save_model, tiny_model
from train_fixtures import make_corpus


@pytest.fixture
def files(tmp_path):
    """A speechssl checkpoint and files of every other kind."""
    good = save_model(tmp_path / "good.pt", tiny_model())
    out = {"good": good}
    (tmp_path / "empty.pt").write_bytes(b"")
    out["empty"] = tmp_path / "empty.pt"
    (tmp_path / "truncated.pt").write_bytes(good.read_bytes()[:1000])
    out["truncated"] = tmp_path / "truncated.pt"
    (tmp_path / "random.pt").write_bytes(np.random.default_rng(0).bytes(5000))
    out["random"] = tmp_path / "random.pt"
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    out["text"] = tmp_path / "notes.txt"
    weights = {"encoder.layers.0.self_attn.k_proj.weight": torch.zeros(2, 2)}
    torch.save({"args": argparse.Namespace(arch="wav2vec2"), "model": weights,
                "optimizer_history": [{"num_updates": 5}]}, tmp_path / "wav2vec_small.pt")
    out["fairseq"] = tmp_path / "wav2vec_small.pt"
    torch.save({"cfg": {"model": {"_name": "wav2vec_ctc"}}, "args": None, "optimizer_history": [],
                "model": {"w2v_encoder.proj.weight": torch.zeros(2, 2)}}, tmp_path / "wav2vec_small_960h.pt")
    out["fairseq_ctc"] = tmp_path / "wav2vec_small_960h.pt"
    hf = tmp_path / "wav2vec2-base"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "wav2vec2"}))
    torch.save({"wav2vec2.encoder.layers.0.attention.k_proj.weight": torch.zeros(2, 2)}, hf / "pytorch_model.bin")
    out["hf_bin"], out["hf_dir"] = hf / "pytorch_model.bin", hf
    return out


def test_identify_tells_the_kinds_apart(files):
    kinds = {name: identify(path).kind for name, path in files.items()}
    assert kinds == {"good": "speechssl", "empty": "empty", "truncated": "truncated", "random": "random",
                     "text": "text", "fairseq": "fairseq", "fairseq_ctc": "fairseq", "hf_bin": "hf", "hf_dir": "hf"}
    assert identify(files["fairseq_ctc"]).ctc and not identify(files["fairseq"]).ctc


def test_messages_give_the_exact_import_command(files, tmp_path):
    fs = not_a_checkpoint_message(files["fairseq"])
    assert fs == (f"{files['fairseq']} is a fairseq checkpoint (pretraining), not a speechssl checkpoint; convert it "
                  f"first: speechssl import {files['fairseq']} --from fairseq --out "
                  f"{tmp_path / 'wav2vec_small.speechssl.pt'}, then use the .speechssl.pt file")
    assert "--dict dict.ltr.txt" in not_a_checkpoint_message(files["fairseq_ctc"])
    hf = not_a_checkpoint_message(files["hf_bin"])
    assert f"speechssl import {files['hf_dir']} --from hf --out {tmp_path / 'wav2vec2-base.speechssl.pt'}" in hf
    assert "truncated or damaged (1000 bytes" in not_a_checkpoint_message(files["truncated"])
    assert "an empty file (0 bytes)" in not_a_checkpoint_message(files["empty"])


@pytest.mark.parametrize("command", ["evaluate", "export", "extract", "w2v_path"])
@pytest.mark.parametrize("kind, expect", [
    ("fairseq", "--from fairseq --out"), ("hf_bin", "--from hf --out"), ("truncated", "truncated or damaged"),
    ("empty", "an empty file"), ("random", "unknown format"), ("text", "a text file"),
])
def test_foreign_file_where_a_checkpoint_is_expected(files, tmp_path, capsys, command, kind, expect):
    path = files[kind]
    man = make_corpus(tmp_path, {"train": [16000] * 3, "valid": [16000]})
    for split, n in (("train", 3), ("valid", 1)):
        (man / f"{split}.ltr").write_text("A | B |\n" * n)
        (man / f"{split}.wrd").write_text("A B\n" * n)
    (man / "dict.ltr.txt").write_text("| 4\nA 4\nB 4\n")
    argv = {"evaluate": ["evaluate", str(path), str(man)],
            "export": ["export", str(path), "--to", "hf", "--out", str(tmp_path / "exported")],
            "extract": ["extract", str(path), str(man), "--split", "train", "--out", str(tmp_path / "feats")],
            "w2v_path": ["finetune", "ctc_tiny", f"task.data={man}", f"model.w2v_path={path}",
                         f"checkpoint.save_dir={tmp_path / 'run'}"]}[command]
    rc = main(argv)
    captured = capsys.readouterr()
    text = captured.err + captured.out
    assert rc != 0 and str(path) in text and expect in text
    assert "weights_only" not in text and "Traceback" not in text
    assert not (tmp_path / "exported").exists() and not (tmp_path / "feats").exists()


@pytest.mark.parametrize("kind, fmt, expect", [
    ("random", "fairseq", "unknown format"), ("empty", "fairseq", "an empty file"),
    ("text", "fairseq", "is a text file, not a fairseq checkpoint"), ("hf_dir", "fairseq", "--from hf"),
    ("good", "fairseq", "a speechssl checkpoint already"), ("random", "fairseq2", "not a fairseq2 asset card"),
    ("hf_bin", "hf", f"--from hf"), ("truncated", "fairseq", "truncated"),
])
def test_import_of_the_wrong_kind_of_file(files, tmp_path, capsys, kind, fmt, expect):
    rc = main(["import", str(files[kind]), "--from", fmt, "--out", str(tmp_path / "imported.pt")])
    captured = capsys.readouterr()
    assert rc == 1 and str(files[kind]) in captured.err and expect in captured.err
    assert "Traceback" not in captured.err and not (tmp_path / "imported.pt").exists()


def test_import_of_a_binary_asset_card(files, tmp_path, capsys):
    card = tmp_path / "card.yaml"
    card.write_bytes(b"\xff\xfe" + np.random.default_rng(1).bytes(100))
    assert main(["import", str(card), "--from", "fairseq2", "--out", str(tmp_path / "x.pt")]) == 1
    err = capsys.readouterr().err
    assert str(card) in err and "Traceback" not in err


# --------------------------------------------------------------------------------------------------
# export --force
# --------------------------------------------------------------------------------------------------


def tree(folder):
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in folder.rglob("*")}


def test_export_force_refuses_a_folder_with_other_files(files, tmp_path, capsys):
    out = tmp_path / "mine"
    (out / "sub").mkdir(parents=True)
    (out / "notes.txt").write_text("my notes\n")
    (out / "sub" / "keep.txt").write_text("keep\n")
    (out / "config.json").write_text("{}\n")
    before = tree(out)
    assert main(["export", str(files["good"]), "--to", "torchaudio", "--out", str(out), "--force"]) == 1
    err = capsys.readouterr().err
    assert f"--out {out} holds files that speechssl export did not write (notes.txt, sub/)" in err
    assert tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary folder


def test_export_force_replaces_an_earlier_export_with_the_umask(files, tmp_path, capsys):
    out = tmp_path / "exported"
    old = os.umask(0o027)
    try:
        assert main(["export", str(files["good"]), "--to", "hf", "--out", str(out)]) == 0
        assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
        assert main(["export", str(files["good"]), "--to", "torchaudio", "--out", str(out), "--force"]) == 0
    finally:
        os.umask(old)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.pt"]  # the hf files replaced
    assert stat.S_IMODE(out.stat().st_mode) == 0o750
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {0o640}


def test_resampled_audio_gets_the_umask(tmp_path):
    audio = tmp_path / "raw" / "s1" / "c1"
    audio.mkdir(parents=True)
    for i in range(3):
        sf.write(audio / f"u{i}.wav", (0.1 * np.random.default_rng(i).standard_normal(8000)).astype(np.float32), 8000)
    old = os.umask(0o022)
    try:
        assert main(["manifest", str(tmp_path / "raw"), "--out", str(tmp_path / "man"), "--valid-percent", "0",
                     "--resample-to", str(tmp_path / "conv"), "--quiet"]) == 0
    finally:
        os.umask(old)
    converted = list((tmp_path / "conv").rglob("*.flac"))
    assert len(converted) == 3 and {stat.S_IMODE(p.stat().st_mode) for p in converted} == {0o644}


def test_export_of_a_log_mel_model_is_refused_with_the_reason(tmp_path, capsys):
    import dataclasses

    from speechssl.cli import main
    from speechssl.models import Wav2Vec2Model, wav2vec2_tiny_config
    from test_interop_common import save_model

    model = Wav2Vec2Model(dataclasses.replace(wav2vec2_tiny_config(), extractor_mode="fbank"))
    ckpt = save_model(tmp_path / "mel.pt", model)
    for target in ("hf", "torchaudio", "onnx"):
        assert main(["export", str(ckpt), "--to", target, "--out", str(tmp_path / target)]) == 1
        err = capsys.readouterr().err
        assert "log-mel front-end" in err and "only waveform models export" in err
        assert not (tmp_path / target).exists()
