"""``speechssl evaluate``: outputs, report keys, the WER line, and clear errors for unusable inputs."""

from __future__ import annotations

import json

import pytest

from ctc_fixtures import make_tone_corpus, tiny_ctc_recipe, write_split
from speechssl.config import load_config
from speechssl.train.checkpoint import save_checkpoint


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """An (untrained) CTC checkpoint made by the fine-tuning task, and its corpus."""
    from speechssl.tasks.ctc import build_ctc_finetuning

    root = tmp_path_factory.mktemp("eval")
    corpus = make_tone_corpus(root / "data", num_train=4)
    cfg = load_config(tiny_ctc_recipe(root / "r.yaml", corpus, root / "run"))
    model = build_ctc_finetuning(cfg).model
    ckpt = root / "ckpt.pt"
    save_checkpoint({"model": model.state_dict(), "config": cfg.to_dict(), "num_updates": 0}, ckpt)
    return ckpt, corpus


def test_evaluate_writes_report_and_prints_wer_last(setup, tmp_path, capsys):
    from speechssl.cli import main

    ckpt, corpus = setup
    out = tmp_path / "out"
    assert main(["evaluate", str(ckpt), str(corpus), "--split", "test", "--out", str(out), "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    report = json.loads((out / "report.json").read_text())
    assert lines[-1].startswith(f"WER {report['wer']:.2f}%")
    assert {"wer", "cer", "num_utterances"} <= set(report) and report["num_utterances"] == 6
    assert set(report["per_speaker"]) == {"s1", "s2"}
    rows = (out / "utterances.tsv").read_text().splitlines()
    assert len(rows) == 7 and rows[0].startswith("path\tspeaker")
    assert (out / "ref.wrd").read_text().splitlines()[0] == "AB CAD"
    assert len((out / "hyp.wrd").read_text().splitlines()) == 6
    # never overwrites without --force
    assert main(["evaluate", str(ckpt), str(corpus), "--split", "test", "--out", str(out)]) == 1
    assert "--force" in capsys.readouterr().err
    assert main(["evaluate", str(ckpt), str(corpus), "--split", "test", "--out", str(out), "--force",
                 "--decoder", "beam", "--beam-size", "4"]) == 0
    assert json.loads((out / "report.json").read_text())["decoder"] == "beam"


def test_evaluate_api_greedy_and_beam(setup):
    from speechssl.tasks.ctc_eval import evaluate_ctc

    ckpt, corpus = setup
    greedy = evaluate_ctc(ckpt, corpus, "valid", quiet=True)
    beam = evaluate_ctc(ckpt, corpus, "valid", decoder="beam", beam_size=8, quiet=True)
    assert greedy["num_utterances"] == beam["num_utterances"] == 6


def test_manifest_without_labels_is_a_clear_error(setup, tmp_path, capsys):
    from speechssl.cli import main

    ckpt, _ = setup
    unlabeled = tmp_path / "unlabeled"
    write_split(unlabeled, "valid", ["AB", "CD"], seed=3, labels=False)
    assert main(["evaluate", str(ckpt), str(unlabeled)]) == 1
    err = capsys.readouterr().err
    assert "valid.wrd" in err and "no transcripts" in err
    assert main(["evaluate", str(ckpt), str(unlabeled), "--split", "test"]) == 1
    assert "test.tsv" in capsys.readouterr().err


def test_not_a_finetuned_checkpoint(setup, tmp_path, capsys):
    import torch

    from speechssl.cli import main

    _, corpus = setup
    bad = tmp_path / "bad.pt"
    torch.save({"weights": torch.zeros(1)}, bad)
    assert main(["evaluate", str(bad), str(corpus)]) == 1
    assert "speechssl import" in capsys.readouterr().err
