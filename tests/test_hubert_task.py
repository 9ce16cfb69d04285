"""HuBERT pretraining task: label dictionaries, start-up label checks, label crops, the CLI end to end."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
import yaml

from speechssl.cli import main
from speechssl.config import _to_plain
from speechssl.data.dataset import AudioDataset, ManifestError
from speechssl.data.labels import LabelCollater, LabelDictionary, check_label_lengths
from speechssl.models import hubert_tiny_config
from train_fixtures import make_corpus

pytestmark = pytest.mark.usefixtures("one_thread")

SR = 16000
LENGTHS = [6000 + 700 * i for i in range(10)]


def write_labels(man, split, lengths, rate, k=6, symbols=None):
    """Labels at ``rate``/s: label j of an utterance is ``j % k`` (so crops are checkable)."""
    lines = [" ".join(str(j % k) for j in range(int(n * rate / SR) - 1)) for n in lengths]
    (man / f"{split}.km").write_text("\n".join(lines) + "\n")
    (man / "dict.km.txt").write_text("".join(f"{s} 1\n" for s in (symbols or range(k))))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hubert")
    man = make_corpus(tmp, {"train": LENGTHS, "valid": [7000, 9000]})
    return tmp, man


def test_dictionary(tmp_path):
    (tmp_path / "dict.km.txt").write_text("3 10\n0 5\n7 1\n")
    d = LabelDictionary(tmp_path / "dict.km.txt")
    assert len(d) == 3
    assert d.encode("7 3 0 0").tolist() == [2, 0, 1, 1]
    with pytest.raises(ManifestError, match=r"\['5'\] are not in .*dict.km.txt"):
        d.encode("3 5", "utt 1")
    (tmp_path / "dict.phn.txt").write_text("AA 1\nB 2\n")
    assert LabelDictionary(tmp_path / "dict.phn.txt").encode("B AA").tolist() == [1, 0]
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(ManifestError, match="empty.txt: the label dictionary is empty"):
        LabelDictionary(tmp_path / "empty.txt")
    with pytest.raises(ManifestError, match="label dictionary not found"):
        LabelDictionary(tmp_path / "dict.none.txt")


def test_wrong_label_rate_is_caught(tmp_path):
    man = make_corpus(tmp_path, {"train": [16000, 24000, 32000]})
    write_labels(man, "train", [16000, 24000, 32000], rate=50)
    ds = AudioDataset(man / "train.tsv", SR, label_files=[man / "train.km"])
    check_label_lengths(ds, ["km"], 50)  # right rate: fine (1 label short is within 0.1 s)
    with pytest.raises(ManifestError) as err:
        check_label_lengths(ds, ["km"], 100)
    msg = str(err.value)
    assert "3 of 3 utterances" in msg and "task.label_rate=100" in msg and "look like 50 labels/s" in msg
    assert "train_000.flac (TSV line 2): 16000 samples = 1.000 s, 49 labels = 0.490 s" in msg


def test_crops_follow_the_audio_offset(corpus):
    tmp, man = corpus
    write_labels(man, "train", LENGTHS, rate=100, k=1000)
    ds = AudioDataset(man / "train.tsv", SR, max_sample_size=5000, label_files=[man / "train.km"])
    collater = LabelCollater([LabelDictionary(man / "dict.km.txt")], 100, SR)
    items = [ds[(i, 5000, 3)] for i in (2, 5, 9)]
    assert any(it["offset"] > 0 for it in items)
    batch = collater(items)
    (targets,) = batch["target_list"]
    assert targets.shape == (3, round(5000 * 100 / SR))
    for row, it in zip(targets, items):
        start = round(it["offset"] * 100 / SR)
        assert row.tolist() == [(start + j) % 1000 for j in range(len(row))]
    # padded batches: each item keeps its own labels, the rest is -1
    padded = LabelCollater([LabelDictionary(man / "dict.km.txt")], 100, SR, pad=True)
    short, long = AudioDataset(man / "train.tsv", SR, pad=True, label_files=[man / "train.km"])[0], \
        AudioDataset(man / "train.tsv", SR, pad=True, label_files=[man / "train.km"])[9]
    t = padded([short, long])["target_list"][0]
    assert t.shape[1] == round(LENGTHS[9] * 100 / SR)
    n0 = int(LENGTHS[0] * 100 / SR) - 1
    assert (t[0, :n0] >= 0).all() and (t[0, n0:] == -1).all()


def hubert_recipe(tmp, **extra):
    model = _to_plain(dataclasses.asdict(hubert_tiny_config(num_classes=[], label_rate=-1.0)))
    rec = {
        "base": "hubert_base_iter1.yaml",
        "model": {**model, "feature_grad_mult": 1.0},
        "common": {"fp16": False, "log_interval": 2, "log_format": "simple", "seed": 3},
        "task": {"max_sample_size": 8000, "min_sample_size": 4000, "label_rate": 50},
        "dataset": {"max_tokens": 16000, "num_workers": 0, "validate_interval": 1},
        "distributed_training": {"distributed_world_size": 1, "find_unused_parameters": False},
        "optimization": {"max_update": 4, "lr": 2e-3},
        "lr_scheduler": {"warmup_updates": 1},
        "checkpoint": {"save_interval_updates": 2, "keep_interval_updates": 1},
    }
    for section, body in extra.items():
        rec.setdefault(section, {}).update(body)
    path = tmp / "hubert.yaml"
    path.write_text(yaml.safe_dump(rec))
    return path


def test_pretrain_cli_end_to_end_and_label_errors(corpus, capsys):
    tmp, man = corpus
    labels = tmp / "labels"
    labels.mkdir(exist_ok=True)
    write_labels(labels, "train", LENGTHS, rate=50, k=6)
    write_labels(labels, "valid", [7000, 9000], rate=50, k=6)
    recipe = hubert_recipe(tmp)
    run = tmp / "run"
    args = ["pretrain", str(recipe), f"task.data={man}", f"task.label_dir={labels}", f"checkpoint.save_dir={run}"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "HubertModel" in out and "[6] classes" in out and "accuracy" in out
    state = torch.load(run / "checkpoint_last.pt", weights_only=True)
    assert state["num_updates"] == 4
    assert state["config"]["model"]["num_classes"] == [6] and state["config"]["model"]["label_rate"] == 50
    assert state["model"]["label_embs_concat"].shape == (6, 16)
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r["split"] == "train"]
    # pred_nomask_weight 0 (the recipe's): no unmasked logits are computed, hence no accuracy_unmasked
    assert train and all(0 <= r["accuracy"] <= 1 and "accuracy_unmasked" not in r for r in train)
    assert any(r["split"] == "valid" for r in recs)
    # resumes: two more updates on top
    assert main(args + ["optimization.max_update=6"]) == 0
    assert torch.load(run / "checkpoint_last.pt", weights_only=True)["num_updates"] == 6
    capsys.readouterr()

    # the checkpoint rebuilds without the dictionaries (layer features for iteration 2)
    from speechssl.features.layer import LayerExtractor

    ex = LayerExtractor(run / "checkpoint_last.pt", layer=1, device="cpu")
    assert ex.compute(torch.randn(8000)).shape == (24, 48)

    # wrong label rate: 50 Hz labels read as 100 Hz
    bad = args[:-1] + [f"checkpoint.save_dir={tmp / 'bad'}", "task.label_rate=100"]
    assert main(bad) == 1
    err = capsys.readouterr().err
    assert "task.label_rate=100" in err and "look like 50 labels/s" in err and "train_000.flac" in err
    # empty dictionary
    (labels / "dict.km.txt").write_text("")
    assert main(args[:-1] + [f"checkpoint.save_dir={tmp / 'bad2'}"]) == 1
    assert "the label dictionary is empty" in capsys.readouterr().err
    # no labels configured
    (labels / "dict.km.txt").write_text("".join(f"{i} 1\n" for i in range(6)))
    assert main(args[:-1] + [f"checkpoint.save_dir={tmp / 'bad3'}", "task.labels=[]"]) == 2
    assert "task.labels is empty" in capsys.readouterr().err
    assert np.all(np.isfinite([r["loss"] for r in train]))
