"""Speaker-ID task end to end on synthetic speakers: labels, a tiny training run, evaluation, checkpoints."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml

from speechssl.config import ConfigError, _to_plain, load_config
from speechssl.data.dataset import ManifestError
from speechssl.models import wav2vec2_tiny_config

SR = 16000
# speaker -> (f0 in Hz, spectral tilt of the harmonics, noise level). A randomly initialised wav2vec 2.0
# front-end (per-channel GroupNorm over time) keeps pitch but little of the spectral envelope, and is
# thrown by loud noise: the voices differ mainly in pitch.
VOICES = {"anna": (110.0, 2.0, 0.03), "bert": (175.0, 3.0, 0.03), "cleo": (260.0, 2.5, 0.03), "dan": (390.0, 3.0, 0.03)}


def voice(speaker: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """Harmonic tone with the speaker's pitch (jittered per utterance) and spectrum, plus coloured noise."""
    f0, tilt, noise = VOICES[speaker]
    f0 *= 1 + 0.03 * rng.standard_normal()
    t = np.arange(n) / SR
    h = np.arange(1, 9)[:, None]
    x = (h.astype(float) ** -tilt * np.sin(2 * np.pi * h * f0 * t + rng.uniform(0, 6.3, (8, 1)))).sum(0)
    white = rng.standard_normal(n)
    x += noise * (white + np.r_[0.0, white[:-1]])  # a low-passed noise floor
    return (rng.uniform(0.1, 0.4) * x / np.abs(x).max()).astype(np.float32)


def make_speaker_manifest(root: Path, per_speaker: dict[str, int], seed: int = 0,
                          extra_valid: tuple[str, ...] = ()) -> Path:
    """LibriSpeech-like speaker/utt files and a closed-set train/valid manifest (+ .spk, dict.spk.txt)."""
    rng = np.random.default_rng(seed)
    audio, man = root / "audio", root / "manifest"
    man.mkdir(parents=True)
    rows: dict[str, list[tuple[str, int, str]]] = {"train": [], "valid": []}
    for spk in VOICES:
        (audio / spk).mkdir(parents=True)
        for i in range(per_speaker["train"] + per_speaker["valid"]):
            n = int(rng.integers(12000, 20000))
            name = f"{spk}/{spk}-{i:02d}.flac"
            sf.write(audio / name, voice(spk, n, rng), SR)
            rows["train" if i < per_speaker["train"] else "valid"].append((name, n, spk))
    for spk in extra_valid:  # a speaker unknown to training
        name = f"{spk}-00.flac"
        sf.write(audio / name, voice("anna", 12000, rng), SR)
        rows["valid"].append((name, 12000, spk))
    for split, items in rows.items():
        order = rng.permutation(len(items))  # speakers interleaved in the manifest
        items = [items[i] for i in order]
        (man / f"{split}.tsv").write_text("\n".join([str(audio)] + [f"{p}\t{n}" for p, n, _ in items]) + "\n")
        (man / f"{split}.spk").write_text("\n".join(s for _, _, s in items) + "\n")
    counts = {s: sum(1 for *_, x in rows["train"] if x == s) for s in VOICES}
    (man / "dict.spk.txt").write_text("".join(f"{s} {c}\n" for s, c in sorted(counts.items(), key=lambda kv: -kv[1])))
    return man


ARCHITECTURE = ("conv_feature_layers", "encoder_layers", "encoder_embed_dim", "encoder_ffn_embed_dim",
                "encoder_attention_heads", "conv_pos", "conv_pos_groups", "final_dim", "latent_vars", "latent_groups")


def speaker_recipe(path: Path, data: Path, save_dir: Path, **model) -> Path:
    tiny = {k: v for k, v in dataclasses.asdict(wav2vec2_tiny_config()).items() if k in ARCHITECTURE}
    rec = {
        "base": "speaker_id_frozen.yaml",
        "common": {"log_format": "simple", "log_interval": 10, "seed": 1},
        "task": {"data": str(data), "max_sample_size": 8000, "min_sample_size": 8000},
        "dataset": {"max_tokens": 64000, "num_workers": 0, "validate_interval_updates": 20},
        "optimization": {"max_update": 40, "lr": 0.03},
        "lr_scheduler": {"warmup_updates": 5},
        "checkpoint": {"save_dir": str(save_dir), "save_interval_updates": 20},
        "model": {**_to_plain(tiny), "w2v_path": None, "projector_dim": 32, **model},
    }
    path.write_text(yaml.safe_dump(rec))
    return path


def test_labels_align_with_utterances(tmp_path, one_thread):
    from speechssl.tasks.speaker_id import SpeakerCollater, build_speaker_id

    man = make_speaker_manifest(tmp_path, {"train": 3, "valid": 1})
    # one training file too short for min_sample_size: dropped, the labels must stay aligned
    lines = (man / "train.tsv").read_text().splitlines()
    path, _ = lines[2].split("\t")
    (man / "train.tsv").write_text("\n".join(lines[:2] + [f"{path}\t7000"] + lines[3:]) + "\n")
    cfg = load_config(speaker_recipe(tmp_path / "r.yaml", man, tmp_path / "run"))
    setup = build_speaker_id(cfg)
    train = setup.train_data
    assert train.num_dropped == 1 and len(train) == 11
    speakers = [line.split()[0] for line in (man / "dict.spk.txt").read_text().splitlines()]
    batch = setup.collate([train[i] for i in range(len(train))])
    for i, target in enumerate(batch["target"].tolist()):
        assert train.path(i).parent.name == speakers[target]  # the file's speaker folder
    assert isinstance(setup.collate, SpeakerCollater) and setup.model.speakers == speakers
    assert cfg.model.encoder_layers == 2  # the resolved architecture is what the checkpoints store


def test_unknown_valid_speaker_is_a_clear_error(tmp_path):
    from speechssl.tasks.speaker_id import build_speaker_id

    man = make_speaker_manifest(tmp_path, {"train": 2, "valid": 1}, extra_valid=("zoe",))
    cfg = load_config(speaker_recipe(tmp_path / "r.yaml", man, tmp_path / "run"))
    with pytest.raises(ManifestError, match=r"valid\.\*.*zoe.*closed-set.*split-by utterance"):
        build_speaker_id(cfg)
    cfg = load_config(speaker_recipe(tmp_path / "r.yaml", man, tmp_path / "run"), ["criterion.name=wav2vec"])
    with pytest.raises(ConfigError, match="criterion.name=speaker_id"):
        build_speaker_id(cfg)


def test_tiny_run_separates_synthetic_speakers_and_evaluates(tmp_path, one_thread, capsys):
    from speechssl.cli import main
    from speechssl.tasks.speaker_id import load_speaker_checkpoint
    from speechssl.tasks.speaker_id_eval import evaluate_speaker_id

    man = make_speaker_manifest(tmp_path, {"train": 6, "valid": 3})
    run = tmp_path / "run"
    recipe = speaker_recipe(tmp_path / "r.yaml", man, run)
    assert main(["finetune", str(recipe)]) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    valid = [r for r in records if r.get("split") == "valid"]
    assert valid[-1]["update"] == 40 and valid[-1]["count"] == 12
    best = max(r["accuracy"] for r in valid)
    assert best >= 0.75, f"valid accuracy {best} (chance 0.25)"

    model, cfg = load_speaker_checkpoint(run / "checkpoint_best.pt")
    assert cfg.task.name == "speaker_id" and cfg.model.freeze_upstream and len(model.speakers) == 4
    capsys.readouterr()
    argv = ["evaluate", str(run / "checkpoint_best.pt"), str(man), "--split", "valid", "--out", str(tmp_path / "eval"),
            "--eer-trials", "400", "--device", "cpu"]
    assert main(argv) == 0
    out = capsys.readouterr().out.strip().splitlines()
    saved = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert out[-1].startswith(f"accuracy: {saved['accuracy']:.2f}%")
    assert saved["batch_size"] == 1  # group-norm extractor: one utterance at a time (exact)
    assert saved["accuracy"] == pytest.approx(100 * best, abs=0.01)  # the best checkpoint
    assert saved["num_utterances"] == 12 and saved["top5_accuracy"] == 100.0  # 4 speakers: top-5 = all
    assert sorted(saved["per_speaker"]) == sorted(VOICES)
    assert all(v["count"] == 3 for v in saved["per_speaker"].values())
    assert 0.0 <= saved["eer"] < 50.0 and saved["num_trials"] == 400
    assert (tmp_path / "eval" / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len((tmp_path / "eval" / "predictions.tsv").read_text().splitlines()) == 13
    extra = argparse.Namespace(max_tokens=None, eer_trials=0, force=False)
    with pytest.raises(ConfigError, match="--force"):
        evaluate_speaker_id(run / "checkpoint_best.pt", man, "valid", tmp_path / "eval", device="cpu", extra=extra)
    report = evaluate_speaker_id(run / "checkpoint_best.pt", man, "valid", None, batch_size=12, extra=extra)
    assert "eer" not in report and report["num_utterances"] == 12  # a padded batch, no files


def test_frozen_run_keeps_the_pretrained_upstream_and_resumes(tmp_path, one_thread):
    """Frozen mode from a 'pretrained' checkpoint: the upstream weights in every checkpoint are the
    pretrained ones, bit for bit; a resumed run continues instead of restarting."""
    from speechssl.models import Wav2Vec2Model
    from speechssl.tasks.speaker_id import build_speaker_id
    from speechssl.train.checkpoint import save_checkpoint
    from speechssl.train.loop import RunOptions, run_training

    torch.manual_seed(3)
    up_cfg = dataclasses.replace(wav2vec2_tiny_config(), encoder_layers=3)
    pretrained = Wav2Vec2Model(up_cfg)
    pre_cfg = load_config(None, [])
    pre_cfg.model = up_cfg
    save_checkpoint({"model": pretrained.state_dict(), "config": pre_cfg.to_dict()}, tmp_path / "pre.pt")
    man = make_speaker_manifest(tmp_path, {"train": 2, "valid": 1})
    run = tmp_path / "run"
    recipe = speaker_recipe(tmp_path / "r.yaml", man, run, w2v_path=str(tmp_path / "pre.pt"), encoder_layers=1)
    every2 = ["checkpoint.save_interval_updates=2", "dataset.validate_interval_updates=2",
              "lr_scheduler.warmup_updates=1"]
    cfg = load_config(recipe, ["optimization.max_update=4", *every2])
    run_training(cfg, build_speaker_id, RunOptions())
    state = torch.load(run / "checkpoint_last.pt", weights_only=True)
    assert state["num_updates"] == 4 and state["config"]["model"]["encoder_layers"] == 3  # the checkpoint's
    for name, value in pretrained.state_dict().items():
        if not name.startswith(("quantizer", "project_q", "final_proj")):
            assert torch.equal(state["model"][f"w2v_model.{name}"], value), name
    head = state["model"]["head.featurizer.weights"]
    assert head.shape == (4,) and not torch.equal(head, torch.zeros(4))
    cfg = load_config(recipe, ["optimization.max_update=6", *every2])
    run_training(cfg, build_speaker_id, RunOptions())
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["update"] for r in records if r.get("split") == "valid"] == [2, 4, 6]


def test_upstream_normalisation_is_required_of_speaker_id(tmp_path):
    """As CTC fine-tuning (fairseq's rule): task.normalize must equal the pretrained upstream's; the random-init
    baseline of the same architecture (no_pretrained_weights) uses no upstream weights and is not checked."""
    from speechssl.models import Wav2Vec2Model
    from speechssl.tasks.speaker_id import build_speaker_id
    from speechssl.train.checkpoint import save_checkpoint

    pre_cfg = load_config(None, ["task.normalize=true"])
    pre_cfg.model = wav2vec2_tiny_config()
    save_checkpoint({"model": Wav2Vec2Model(pre_cfg.model).state_dict(), "config": pre_cfg.to_dict()},
                    tmp_path / "pre.pt")
    man = make_speaker_manifest(tmp_path, {"train": 2, "valid": 1})
    recipe = speaker_recipe(tmp_path / "r.yaml", man, tmp_path / "run", w2v_path=str(tmp_path / "pre.pt"))
    with pytest.raises(ConfigError, match=r"task.normalize=false, but the upstream .*pre\.pt was pretrained with "
                                          r"task.normalize=true"):
        build_speaker_id(load_config(recipe))
    assert build_speaker_id(load_config(recipe, ["task.normalize=true"])).train_data.normalize
    assert build_speaker_id(load_config(recipe, ["model.no_pretrained_weights=true"])).model is not None


def test_closed_set_manifest_holds_out_a_share_of_every_speaker(tmp_path):
    from speechssl.tasks.speaker_id import make_closed_set_manifest, read_speaker_dict

    src = tmp_path / "src"
    src.mkdir()
    counts = {"s1": 10, "s2": 20, "s3": 3, "s4": 1}
    rows = [(f"{s}/u{i:02d}.flac", 16000 + i, s) for s, n in counts.items() for i in range(n)]
    (src / "train.tsv").write_text("/audio\n" + "".join(f"{p}\t{n}\n" for p, n, _ in rows))
    (src / "train.spk").write_text("".join(f"{s}\n" for *_, s in rows))
    sizes = make_closed_set_manifest(src, tmp_path / "out", valid_fraction=0.2, test_fraction=0.2, seed=3)
    assert sum(sizes.values()) == 34 and sizes["valid"] == 7 and sizes["test"] == 7
    seen = {}
    for split in ("train", "valid", "test"):
        tsv = (tmp_path / "out" / f"{split}.tsv").read_text().splitlines()
        spk = (tmp_path / "out" / f"{split}.spk").read_text().splitlines()
        assert tsv[0] == "/audio" and len(tsv) - 1 == len(spk) == sizes[split]
        for line, s in zip(tsv[1:], spk):
            assert line.split("\t")[0].startswith(s + "/")  # labels stay with their utterances
            seen.setdefault(s, []).append(split)
    for s, n in counts.items():
        assert seen[s].count("train") >= 1
        if n >= 10:  # a share of each larger speaker in both held-out splits
            assert seen[s].count("valid") >= 1 and seen[s].count("test") >= 1
    assert read_speaker_dict(tmp_path / "out" / "dict.spk.txt")[0] == "s2"  # train counts, descending
    with pytest.raises(ManifestError, match="force"):
        make_closed_set_manifest(src, tmp_path / "out")


def test_cross_session_manifest_tests_on_a_chapter_never_trained_on(tmp_path):
    from speechssl.tasks.speaker_id import make_cross_session_manifest, read_speaker_dict

    src = tmp_path / "src"
    src.mkdir()
    chapters = {"s1": ["11", "12", "13", "14"], "s2": ["21", "22", "23"], "s3": ["31", "32"]}
    rows = [(f"{s}/{c}/{s}-{c}-{i}.flac", 16000 + i, s) for s, cs in chapters.items() for c in cs for i in range(3)]
    (src / "train.tsv").write_text("/audio\n" + "".join(f"{p}\t{n}\n" for p, n, _ in rows))
    (src / "train.spk").write_text("".join(f"{s}\n" for *_, s in rows))
    sizes = make_cross_session_manifest(src, tmp_path / "out")
    assert sizes == {"train": 9, "valid": 6, "test": 6}  # s3 (2 chapters) left out
    by_split = {}
    for split in ("train", "valid", "test"):
        tsv = (tmp_path / "out" / f"{split}.tsv").read_text().splitlines()[1:]
        spk = (tmp_path / "out" / f"{split}.spk").read_text().splitlines()
        assert all(line.startswith(s + "/") for line, s in zip(tsv, spk))
        by_split[split] = {line.split("/")[1] for line in tsv}
    assert by_split == {"train": {"11", "12", "21"}, "valid": {"13", "22"}, "test": {"14", "23"}}
    assert sorted(read_speaker_dict(tmp_path / "out" / "dict.spk.txt")) == ["s1", "s2"]
    with pytest.raises(ManifestError, match="force"):
        make_cross_session_manifest(src, tmp_path / "out")
