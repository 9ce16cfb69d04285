"""HuBERT labels: <split>.km / dict.km.txt writing, alignment with the TSV, and the label-length check."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from speechssl.cli import main
from speechssl.cluster.kmeans import KMeansModel
from speechssl.cluster.label import (
    LabelError,
    check_dictionary,
    labels_to_text,
    read_label_lengths,
    verify_label_lengths,
)
from speechssl.data.dataset import read_manifest
from speechssl.features.store import FeatureSet
from train_fixtures import make_corpus

TRAIN = [8000, 16000, 12345, 19200, 9600, 24000]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def pipeline(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(manifest dir, MFCC features dir, k-means model) for a 6-utterance train and 2-utterance valid set."""
    man = make_corpus(tmp_path, {"train": TRAIN, "valid": [8800, 10000]})
    feats = tmp_path / "feats"
    for split in ("train", "valid"):
        assert main(["features", "mfcc", str(man), "--split", split, "--out", str(feats), "--nshard", "2",
                     "--num-workers", "0"]) == 0
    km = tmp_path / "km.pt"
    assert main(["kmeans", str(feats), "--k", "8", "--sample-percent", "100", "--out", str(km)]) == 0
    return man, feats, km


def test_verify_label_lengths_catches_a_wrong_label_rate():
    sizes = np.array([16000, 32000, 48123])
    at_50hz = (sizes - 80) // 320  # what 50 Hz layer features give
    assert verify_label_lengths(sizes, at_50hz, 16000, 50) == []
    problems = verify_label_lengths(sizes, at_50hz, 16000, 100)  # declared 100 Hz
    assert [p.index for p in problems] == [0, 1, 2]
    msg = str(problems[1])
    assert "32000 samples = 2.000 s" in msg and "99 labels = 0.990 s at 100 labels/s" in msg
    assert "about 200 expected" in msg and "TSV line 3" in msg
    at_100hz = 1 + (sizes - 400) // 160  # MFCC frames: ~1.5 frames short, within 0.1 s
    assert verify_label_lengths(sizes, at_100hz, 16000, 100) == []
    assert [p.index for p in verify_label_lengths(sizes, at_100hz - 9, 16000, 100, tol=0.1)] == [0, 1, 2]
    assert verify_label_lengths(sizes, at_100hz - 9, 16000, 100, tol=0.15) == []
    with pytest.raises(LabelError, match="one line per TSV entry"):
        verify_label_lengths(sizes, at_100hz[:2], 16000, 100)


def test_dictionary_check_catches_empty_and_incomplete(tmp_path):
    d = tmp_path / "dict.km.txt"
    d.write_text("")
    assert any("empty" in p for p in check_dictionary(d, 4))
    d.write_text("0 1\n1 1\n3 1\n")
    assert any("1 of the 4 cluster ids are missing" in p for p in check_dictionary(d, 4))
    d.write_text("0 1\n1 1\n2 1\n3 1\n")
    assert check_dictionary(d, 4) == []


def test_labels_to_text_keeps_utterance_boundaries():
    assert labels_to_text(np.array([3, 3, 1, 0, 12]), np.array([2, 0, 3])) == "3 3\n\n1 0 12\n"
    with pytest.raises(LabelError):
        labels_to_text(np.array([1, 2]), np.array([3]))


def test_labels_align_with_the_tsv(pipeline):
    man, feats, km = pipeline
    assert main(["label", str(man), "--split", "train", "--features", str(feats), "--km", str(km)]) == 0
    assert main(["label", str(man), "--split", "valid", "--features", str(feats), "--km", str(km)]) == 0
    model, fs = KMeansModel.load(km), FeatureSet.open(feats, "train")
    lines = (man / "train.km").read_text().splitlines()
    assert len(lines) == len(read_manifest(man / "train.tsv").files) == len(TRAIN)
    for i, line in enumerate(lines):
        ids = np.array(line.split(), dtype=np.int64)
        assert len(ids) == 1 + (TRAIN[i] - 400) // 160  # MFCC frames of TSV entry i
        np.testing.assert_array_equal(ids, model.predict(np.asarray(fs.utterance(i))).numpy())
    np.testing.assert_array_equal(read_label_lengths(man / "train.km"), fs.lengths)
    assert (man / "dict.km.txt").read_text() == "".join(f"{i} 1\n" for i in range(8))
    assert not any(p.name.endswith(".parts") for p in man.iterdir())
    assert main(["manifest", "--check", str(man)]) == 0


def test_wrong_label_rate_fails_and_writes_nothing(pipeline, capsys):
    man, feats, km = pipeline
    assert main(["label", str(man), "--features", str(feats), "--km", str(km), "--label-rate", "50"]) == 1
    err = capsys.readouterr().err
    assert "6 of 6 utterances" in err and "at 50 labels/s" in err and "entry 3 (TSV line 5): 19200 samples" in err
    assert not (man / "train.km").exists() and not (man / "dict.km.txt").exists()
    # the labeled parts are kept: the rerun with the right rate only checks and writes
    assert main(["label", str(man), "--features", str(feats), "--km", str(km), "--label-rate", "100"]) == 0
    assert "already done" in capsys.readouterr().out


def test_never_overwrites_without_force(pipeline, tmp_path, capsys):
    man, feats, km = pipeline
    out = tmp_path / "labels"
    assert main(["label", str(man), "--features", str(feats), "--km", str(km), "--out", str(out)]) == 0
    before = (out / "train.km").read_text()
    assert main(["label", str(man), "--features", str(feats), "--km", str(km), "--out", str(out)]) == 1
    assert "exists; pass --force" in capsys.readouterr().err
    (out / "dict.km.txt").write_text("")  # an empty dictionary would turn every label into <unk>
    (out / "train.km").unlink()
    assert main(["label", str(man), "--features", str(feats), "--km", str(km), "--out", str(out)]) == 1
    assert "dict.km.txt exists" in capsys.readouterr().err
    assert main(["label", str(man), "--features", str(feats), "--km", str(km), "--out", str(out), "--force"]) == 0
    assert (out / "train.km").read_text() == before and check_dictionary(out / "dict.km.txt", 8) == []
    assert not (man / "train.km").exists()


def test_sharded_labeling_writes_when_the_last_shard_is_done(pipeline, tmp_path, capsys):
    man, feats, km = pipeline
    out = tmp_path / "labels"
    common = ["label", str(man), "--features", str(feats), "--km", str(km), "--out", str(out), "--nshard", "2"]
    assert main([*common, "--shard", "1"]) == 0
    assert not (out / "train.km").exists() and "1 of 2 shards" in capsys.readouterr().out
    assert main([*common, "--shard", "0"]) == 0
    assert len((out / "train.km").read_text().splitlines()) == len(TRAIN)


def test_features_of_another_tsv_are_refused(pipeline, capsys):
    man, feats, km = pipeline
    tsv = man / "train.tsv"
    lines = tsv.read_text().splitlines()
    tsv.write_text("\n".join([lines[0], *reversed(lines[1:])]) + "\n")  # same files, other order
    assert main(["label", str(man), "--features", str(feats), "--km", str(km)]) == 1
    assert "another version of" in capsys.readouterr().err
