"""Feature extraction for HuBERT targets: MFCC, layer features, the sharded memmap store, resume."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from speechssl.cli import main
from speechssl.features.mfcc import MfccExtractor
from speechssl.features.store import (
    FeatureSet,
    FeatureStoreError,
    ShardFiles,
    ShardWriter,
    resolve_shards,
    shard_range,
)
from train_fixtures import make_corpus

SR = 16000


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """Manifest folder with 7 train utterances (0.3-1.2 s) and 2 valid ones."""
    return make_corpus(tmp_path, {"train": [4800, 16000, 8123, 19200, 6400, 12345, 9600], "valid": [8000, 11000]})


def features(*args: str) -> int:
    return main(["features", *args, "--num-workers", "0"])


def test_mfcc_matches_torchaudio_kaldi_at_100hz():
    import torchaudio.compliance.kaldi as kaldi
    import torchaudio.functional as F

    ex = MfccExtractor(SR)
    wave = (0.1 * np.random.default_rng(0).standard_normal(12345)).astype(np.float32)
    feats = ex.prepare(wave)
    mfcc = kaldi.mfcc(torch.from_numpy(wave)[None], sample_frequency=SR, use_energy=False).T
    d = F.compute_deltas(mfcc)
    expected = torch.cat([mfcc, d, F.compute_deltas(d)]).T.numpy()
    assert feats.shape == (1 + (12345 - 400) // 160, 39) == expected.shape
    np.testing.assert_array_equal(feats, expected)
    assert ex.rate == 100.0
    sizes = np.array([0, 399, 400, 559, 560, 16000])
    np.testing.assert_array_equal(ex.num_frames(sizes), [0, 0, 1, 1, 2, 98])
    assert [len(ex.prepare(np.zeros(n, np.float32))) for n in sizes] == [0, 0, 1, 1, 2, 98]


def test_mfcc_cmvn_standardizes_each_utterance_and_removes_a_microphone():
    """--cmvn: each utterance's 39 dims to zero mean / unit variance; a fixed filter on the audio (a
    different microphone) moves raw MFCCs far more than standardized ones."""
    rng = np.random.default_rng(0)
    wave = (0.1 * rng.standard_normal(16000)).astype(np.float32)
    wave[4000:8000] *= 4  # some dynamics
    raw, std = MfccExtractor(SR), MfccExtractor(SR, cmvn=True)
    feats = std.prepare(wave)
    np.testing.assert_allclose(feats.mean(axis=0), 0, atol=1e-4)
    np.testing.assert_allclose(feats.std(axis=0), 1, atol=1e-3)
    coloured = np.convolve(wave, [1.0, 0.9], mode="same").astype(np.float32)  # a bright microphone
    shift_raw = np.abs(raw.prepare(coloured) - raw.prepare(wave))[:, :13].mean()
    shift_std = np.abs(std.prepare(coloured) - feats)[:, :13].mean()
    assert shift_std < 0.5 * shift_raw / raw.prepare(wave)[:, :13].std()
    assert std.settings()["cmvn"] is True and raw.settings()["cmvn"] is False


def test_shard_ranges_cover_every_line_once():
    for total in (1, 2, 7, 100, 1001):
        for nshard in range(1, min(total, 9) + 1):
            ranges = [shard_range(total, nshard, i) for i in range(nshard)]
            assert ranges[0][0] == 0 and ranges[-1][1] == total
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
            assert all(s < e for s, e in ranges)
    with pytest.raises(FeatureStoreError, match="at most 3 shards"):
        shard_range(3, 4, 0)
    with pytest.raises(FeatureStoreError, match="below --nshard"):
        shard_range(10, 2, 2)


def test_resolve_shards_follows_torchrun(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert resolve_shards(None, None) == ([0], 1)
    assert resolve_shards(None, 3) == ([0, 1, 2], 3)
    assert resolve_shards(1, 3) == ([1], 3)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    assert resolve_shards(None, None) == ([2], 4)
    with pytest.raises(FeatureStoreError, match="WORLD_SIZE"):
        resolve_shards(None, 3)


def test_store_round_trip_is_memory_mapped(tmp_path):
    rng = np.random.default_rng(0)
    lengths = np.array([3, 0, 5, 2])
    utts = [rng.standard_normal((n, 4)).astype(np.float32) for n in lengths]
    files = ShardFiles.of(tmp_path, "train", 0, 1)
    with ShardWriter(files, lengths, 4) as w:
        for i, u in enumerate(utts):
            w.write(i, u)
        with pytest.raises(FeatureStoreError, match="expected \\(2, 4\\)"):
            w.write(3, utts[2])
        w.commit({"kind": "test", "settings": {}, "rate": 10.0, "sample_rate": 16000, "manifest_sha1": "x",
                  "manifest_lines": 4, "line_start": 0, "line_end": 4})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train_0_1.json", "train_0_1.len", "train_0_1.npy"]
    assert files.len.read_text() == "3\n0\n5\n2\n"  # fairseq's .len: one count per line
    fs = FeatureSet.open(tmp_path, "train")
    assert isinstance(fs.shards[0].data, np.memmap) and fs.dim == 4 and fs.rate == 10.0
    np.testing.assert_array_equal(fs.lengths, lengths)
    for i, u in enumerate(utts):
        np.testing.assert_array_equal(fs.utterance(i), u)
    np.testing.assert_array_equal(np.load(files.npy), np.concatenate(utts))  # a plain .npy for fairseq
    sample, n = fs.sample(1.0)
    assert n == 4 and np.array_equal(sample, np.concatenate(utts))
    sample, n = fs.sample(0.5, seed=3)
    assert n == 2 and sample.shape[1] == 4
    assert FeatureSet.from_npy([files.npy]).num_frames == 10


def test_mfcc_cli_shards_match_one_shard_and_resume(corpus, tmp_path, capsys):
    one, three = tmp_path / "one", tmp_path / "three"
    assert features("mfcc", str(corpus), "--split", "train", "--out", str(one)) == 0
    assert features("mfcc", str(corpus), "--split", "train", "--out", str(three), "--nshard", "3", "--shard", "1") == 0
    assert not (three / "train_0_3.json").exists() and (three / "train_1_3.json").exists()
    mtime = (three / "train_1_3.npy").stat().st_mtime_ns
    capsys.readouterr()
    assert features("mfcc", str(corpus), "--split", "train", "--out", str(three), "--nshard", "3") == 0
    out = capsys.readouterr().out
    assert "shard 1/3 of 'train' is already done" in out and "shard 0/3 of 'train': " in out
    assert (three / "train_1_3.npy").stat().st_mtime_ns == mtime  # skipped, not rewritten

    a, b = FeatureSet.open(one, "train"), FeatureSet.open(three, "train")
    np.testing.assert_array_equal(a.lengths, MfccExtractor().num_frames(
        np.array([4800, 16000, 8123, 19200, 6400, 12345, 9600])))
    np.testing.assert_array_equal(np.concatenate(list(a.chunks())), np.concatenate(list(b.chunks())))
    meta = json.loads((three / "train_2_3.json").read_text())
    assert (meta["line_start"], meta["line_end"], meta["manifest_lines"]) == (5, 7, 7)
    assert meta["dim"] == 39 and meta["rate"] == 100.0 and meta["manifest"] == str((corpus / "train.tsv").resolve())

    # --force redoes a finished shard; a shard whose .json is gone counts as unfinished and is redone
    assert features("mfcc", str(corpus), "--split", "train", "--out", str(three), "--nshard", "3", "--shard", "1",
                    "--force") == 0
    assert (three / "train_1_3.npy").stat().st_mtime_ns != mtime
    (three / "train_0_3.json").unlink()
    with pytest.raises(FeatureStoreError, match="missing or unfinished"):
        FeatureSet.open(three, "train")
    capsys.readouterr()
    assert features("mfcc", str(corpus), "--split", "train", "--out", str(three), "--nshard", "3") == 0
    assert "shard 0/3 of 'train': " in capsys.readouterr().out


def test_finished_shard_of_another_manifest_needs_force(corpus, tmp_path, capsys):
    out = tmp_path / "f"
    assert features("mfcc", str(corpus), "--out", str(out)) == 0
    tsv = corpus / "train.tsv"
    tsv.write_text("\n".join(tsv.read_text().splitlines()[:-1]) + "\n")  # drop the last utterance
    assert features("mfcc", str(corpus), "--out", str(out)) == 1
    assert "made differently" in capsys.readouterr().err
    assert features("mfcc", str(corpus), "--out", str(out), "--force") == 0
    assert len(FeatureSet.open(out, "train").lengths) == 6


def test_failed_shard_leaves_nothing_that_looks_finished(corpus, tmp_path, capsys):
    tsv = corpus / "train.tsv"
    lines = tsv.read_text().splitlines()
    path, n = lines[4].split("\t")
    lines[4] = f"{path}\t{int(n) + 7}"  # stale sample count
    tsv.write_text("\n".join(lines) + "\n")
    out = tmp_path / "f"
    assert features("mfcc", str(corpus), "--out", str(out)) == 1
    err = capsys.readouterr().err
    assert path in err and f"the manifest says {int(n) + 7}" in err
    assert sorted(os.listdir(out)) == []  # no .npy, no temp file, no .json


def test_wrong_sample_rate_is_named(tmp_path, capsys):
    man = make_corpus(tmp_path, {"train": [8000, 8000]}, sample_rate=8000)
    assert features("mfcc", str(man), "--out", str(tmp_path / "f")) == 1
    assert "sample rate 8000 Hz, expected 16000 Hz" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# Layer features
# --------------------------------------------------------------------------------------------------


def tiny_checkpoint(path: Path) -> torch.nn.Module:
    """A tiny wav2vec 2.0 saved as the trainer saves it ('model' state dict + 'config')."""
    from speechssl.config import Config
    from speechssl.models import build_model, wav2vec2_tiny_config
    from speechssl.train.checkpoint import save_checkpoint

    torch.manual_seed(0)
    cfg = Config(model=wav2vec2_tiny_config())
    model = build_model(cfg.model)
    save_checkpoint({"model": model.state_dict(), "config": cfg.to_dict(), "num_updates": 7}, path)
    return model.eval()


def test_layer_features_equal_a_direct_forward_at_50hz(corpus, tmp_path):
    ckpt = tmp_path / "checkpoint_last.pt"
    model = tiny_checkpoint(ckpt)
    out = tmp_path / "l2"
    assert features("layer", str(corpus), "--split", "valid", "--out", str(out), "--ckpt", str(ckpt),
                    "--layer", "2") == 0
    fs = FeatureSet.open(out, "valid")
    assert fs.rate == 50.0 and fs.dim == 48 and fs.meta["settings"]["layer"] == 2
    from speechssl.data.audio import read_audio
    from speechssl.data.dataset import read_manifest

    man = read_manifest(corpus / "valid.tsv")
    for i, rel in enumerate(man.files):
        wave = torch.from_numpy(read_audio(man.root / rel)[0])
        with torch.inference_mode():
            ref = model(wave[None], None, mask=False, features_only=True, output_layer=2)["x"][0]
        assert len(ref) == int(model.feature_extractor.output_lengths(torch.tensor(len(wave))))
        assert abs(len(ref) - len(wave) / SR * 50) <= 1.5  # 50 frames/s: the tiny conv stack is 320x too
        np.testing.assert_allclose(fs.utterance(i), ref.numpy(), rtol=1e-5, atol=1e-5)

    # long utterances are run in chunks (fairseq's max_chunk): the frames of each chunk, concatenated; a
    # remainder shorter than the receptive field (400 samples) joins the previous chunk
    chunked = tmp_path / "chunked"
    assert features("layer", str(corpus), "--split", "valid", "--out", str(chunked), "--ckpt", str(ckpt),
                    "--layer", "1", "--max-chunk", "3900") == 0
    fs = FeatureSet.open(chunked, "valid")
    for i, bounds in [(0, [0, 3900, 8000]), (1, [0, 3900, 7800, 11000])]:  # 8000 = 2 x 3900 + 200: merged
        wave = torch.from_numpy(read_audio(man.root / man.files[i])[0])
        with torch.inference_mode():
            parts = [model(wave[None, a:b], None, mask=False, features_only=True, output_layer=1)["x"][0]
                     for a, b in zip(bounds[:-1], bounds[1:])]
        np.testing.assert_allclose(fs.utterance(i), torch.cat(parts).numpy(), rtol=1e-5, atol=1e-5)
    assert main(["features", "layer", str(corpus), "--split", "valid", "--out", str(chunked), "--ckpt", str(ckpt),
                 "--layer", "1", "--max-chunk", "7800", "--num-workers", "0"]) == 1  # other settings: --force


def test_layer_rejects_bad_checkpoints_and_layers(corpus, tmp_path, capsys):
    ckpt = tmp_path / "c.pt"
    tiny_checkpoint(ckpt)
    assert features("layer", str(corpus), "--out", str(tmp_path / "f"), "--ckpt", str(ckpt), "--layer", "3") == 1
    assert "has layers 1..2" in capsys.readouterr().err
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    assert features("layer", str(corpus), "--out", str(tmp_path / "f"), "--ckpt", str(tmp_path / "other.pt"),
                    "--layer", "1") == 1
    assert "not a speechssl checkpoint" in capsys.readouterr().err
