"""A data2vec 2.0 pretraining checkpoint as an upstream: CTC fine-tuning (and its evaluation), speaker ID,
``speechssl extract`` and ``speechssl probe`` take it like a wav2vec 2.0 one, and the upstream is the student
(the teacher and decoder are left out)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from ctc_fixtures import make_tone_corpus, tiny_ctc_recipe
from speechssl.cli import main
from speechssl.config import Config, load_config
from speechssl.interop.extract import LayerFeatures
from speechssl.models import Data2Vec2Model, data2vec2_tiny_config
from speechssl.train.checkpoint import load_checkpoint, save_checkpoint
from speechssl.train.loop import RunOptions, run_training
from test_speaker_task import make_speaker_manifest, speaker_recipe

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A data2vec 2.0 pretraining checkpoint whose teacher differs from its student."""
    torch.manual_seed(0)
    cfg = Config(model=dataclasses.replace(data2vec2_tiny_config(), mask_prob=0.3, mask_length=2))
    model = Data2Vec2Model(cfg.model)
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("d2v") / "pre.pt"
    save_checkpoint({"model": model.state_dict(), "config": cfg.to_dict(), "num_updates": 10}, path)
    return path, model.eval()


def student_weights(model: Data2Vec2Model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if not k.startswith(("teacher.", "decoder."))}


def test_ctc_fine_tuning_takes_the_student(tmp_path, pretrained):
    from speechssl.tasks.ctc import build_ctc_finetuning
    from speechssl.tasks.ctc_eval import evaluate_ctc

    ckpt, model = pretrained
    corpus = make_tone_corpus(tmp_path / "tones", num_train=8)
    rec = tiny_ctc_recipe(tmp_path / "ctc.yaml", corpus, tmp_path / "ctc",
                          model={"w2v_path": str(ckpt), "freeze_finetune_updates": 3, "apply_mask": True,
                                 "mask_prob": 0.2, "mask_length": 2},
                          optimization={"max_update": 3})
    cfg = load_config(rec)
    run_training(cfg, build_ctc_finetuning, RunOptions())
    state = load_checkpoint(tmp_path / "ctc" / "checkpoint_last.pt")
    assert state["config"]["model"]["name"] == "data2vec2" and state["num_updates"] == 3
    upstream = {k[len("w2v_model."):]: v for k, v in state["model"].items() if k.startswith("w2v_model.")}
    assert upstream.keys() == student_weights(model).keys()  # no teacher, no decoder
    for k, v in student_weights(model).items():  # frozen for 3 updates: the student's weights, bit for bit
        assert torch.equal(upstream[k], v), k
    report = evaluate_ctc(tmp_path / "ctc" / "checkpoint_last.pt", corpus, "test", quiet=True)
    assert report["num_utterances"] == 6 and report["batch_size"] == 1  # the positional stack sees padding


def test_speaker_id_extract_and_probe_take_it(tmp_path, pretrained, capsys):
    from speechssl.tasks.speaker_id import build_speaker_id

    ckpt, model = pretrained
    man = make_speaker_manifest(tmp_path, {"train": 2, "valid": 1})
    rec = speaker_recipe(tmp_path / "sid.yaml", man, tmp_path / "sid", w2v_path=str(ckpt))
    run_training(load_config(rec, ["optimization.max_update=2", "dataset.validate_interval_updates=2",
                                   "checkpoint.save_interval_updates=2", "lr_scheduler.warmup_updates=1"]),
                 build_speaker_id, RunOptions())
    state = load_checkpoint(tmp_path / "sid" / "checkpoint_last.pt")
    assert state["model"]["head.featurizer.weights"].shape == (4,)  # the input + 3 layers
    for k, v in student_weights(model).items():  # frozen upstream (SUPERB): the student, unchanged
        assert torch.equal(state["model"][f"w2v_model.{k}"], v), k

    out = tmp_path / "feats"
    assert main(["extract", str(ckpt), str(man), "--split", "valid", "--layers", "all", "--out", str(out),
                 "--num-workers", "0"]) == 0
    feats = LayerFeatures.open(out, "valid")
    assert feats.layers == [1, 2, 3]
    import soundfile as sf

    root, first = (man / "valid.tsv").read_text().splitlines()[:2]
    wave, _ = sf.read(f"{root}/{first.split(chr(9))[0]}", dtype="float32")
    with torch.no_grad():
        expected = model(torch.from_numpy(wave)[None], mask=False, features_only=True)["layer_results"]
    assert np.abs(feats.utterance(0) - np.stack([x[0].numpy() for x in expected])).max() < 1e-5

    probe = tmp_path / "probe"
    assert main(["probe", str(ckpt), str(man), "--task", "sid", "--updates", "20", "--eval-interval", "10",
                 "--valid-split", "valid", "--test-split", "none", "--out", str(probe)]) == 0
    report = json.loads((probe / "probe.json").read_text())
    assert report["upstream"].startswith("data2vec2") and len(report["layer_weights"]) == 4
    assert "probe sid" in capsys.readouterr().out
