"""AudioDataset: manifest parsing, crops decided by (seed, epoch, index), normalization, checks, collate."""

import numpy as np
import pytest
import soundfile as sf
import torch

from speechssl.data.dataset import AudioDataset, ManifestError, collate, normalize_wave, read_manifest
from train_fixtures import make_corpus


@pytest.fixture()
def corpus(tmp_path):
    return make_corpus(tmp_path, {"train": [3000, 5000, 8000, 1000, 6000]})


def full(ds, i):
    return sf.read(str(ds.path(i)), dtype="float32")[0]


def test_manifest_and_min_size(corpus):
    ds = AudioDataset(corpus / "train.tsv", 16000, max_sample_size=4000, min_sample_size=2000)
    assert ds.num_dropped == 1 and len(ds) == 4
    assert ds.sizes.tolist() == [3000, 5000, 8000, 6000]
    assert ds.batch_sizes.tolist() == [3000, 4000, 4000, 4000]


def test_bad_manifest_lines(tmp_path):
    p = tmp_path / "x.tsv"
    p.write_text("/root\na.flac 100\n")
    with pytest.raises(ManifestError, match=r"x.tsv:2: expected"):
        read_manifest(p)
    p.write_text("/root\na.flac\tmany\n")
    with pytest.raises(ManifestError, match=r"x.tsv:2: num_samples"):
        read_manifest(p)
    with pytest.raises(ManifestError, match="manifest not found"):
        read_manifest(tmp_path / "missing.tsv")


def test_crop_is_a_window_seeded_by_epoch_and_index(corpus):
    ds = AudioDataset(corpus / "train.tsv", 16000, max_sample_size=4000, seed=7)
    a = ds[(2, 3000, 1)]
    assert len(a["source"]) == 3000
    ref = full(ds, 2)
    np.testing.assert_array_equal(a["source"], ref[a["offset"] : a["offset"] + 3000])
    assert ds[(2, 3000, 1)]["offset"] == a["offset"]  # same key, same crop: resumable
    offsets = {ds[(2, 3000, e)]["offset"] for e in range(1, 9)}
    assert len(offsets) > 1  # reshuffled per epoch
    assert ds[(0, 3000, 1)]["offset"] == 0  # nothing to crop


def test_no_random_crop_starts_at_zero(corpus):
    ds = AudioDataset(corpus / "train.tsv", 16000, max_sample_size=4000, random_crop=False)
    assert ds[(2, 3000, 5)]["offset"] == 0


def test_normalize_over_whole_utterance_then_crop(corpus):
    ds = AudioDataset(corpus / "train.tsv", 16000, max_sample_size=4000, normalize=True)
    item = ds[(2, 4000, 3)]
    ref = normalize_wave(full(ds, 2))
    assert abs(ref.mean()) < 1e-5 and abs(ref.std() - 1) < 1e-3
    np.testing.assert_allclose(item["source"], ref[item["offset"] : item["offset"] + 4000], atol=1e-6)


def test_wrong_sample_rate_names_the_file(tmp_path):
    man = make_corpus(tmp_path, {"train": [4000]}, sample_rate=8000)
    ds = AudioDataset(man / "train.tsv", 16000)
    with pytest.raises(ManifestError, match=r"train_000.flac: sample rate 8000 Hz, but task.sample_rate is 16000"):
        ds[0]


def test_manifest_longer_than_file(corpus):
    text = (corpus / "train.tsv").read_text().replace("\t3000", "\t3500")
    (corpus / "bad.tsv").write_text(text)
    ds = AudioDataset(corpus / "bad.tsv", 16000)
    with pytest.raises(ManifestError, match="shorter than .*bad.tsv says"):
        ds[0]


def test_labels_aligned_and_filtered(corpus):
    (corpus / "train.ltr").write_text("a\nb\nc\nd\ne\n")
    ds = AudioDataset(corpus / "train.tsv", 16000, min_sample_size=2000, label_files=[corpus / "train.ltr"])
    assert [ds[i]["labels"] for i in range(len(ds))] == [("a",), ("b",), ("c",), ("e",)]
    (corpus / "short.ltr").write_text("a\nb\n")
    with pytest.raises(ManifestError, match="2 lines but .*5 entries"):
        AudioDataset(corpus / "train.tsv", 16000, label_files=[corpus / "short.ltr"])


def test_collate_crop_and_pad(corpus):
    crop = AudioDataset(corpus / "train.tsv", 16000, max_sample_size=4000)
    idx = np.array([0, 1, 2])
    t = crop.target_len(idx)
    assert t == 3000
    b = collate([crop[(int(i), t, 1)] for i in idx])
    assert b["source"].shape == (3, 3000) and b["padding_mask"] is None and b["audio_samples"] == 9000

    pad = AudioDataset(corpus / "train.tsv", 16000, max_sample_size=4000, pad=True)
    t = pad.target_len(idx)
    assert t == 4000
    b = collate([pad[(int(i), t, 1)] for i in idx])
    assert b["source"].shape == (3, 4000)
    assert b["padding_mask"].sum(1).tolist() == [1000, 0, 0]
    assert b["audio_samples"] == 11000
    assert torch.all(b["source"][0, 3000:] == 0)
    assert b["id"].tolist() == [0, 1, 2]
