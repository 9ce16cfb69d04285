"""Frozen-upstream probes (``speechssl probe``): the BiLSTM, the ASR and SID downstreams, the command."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
import torch
from torch import nn

from speechssl.cli import main
from speechssl.tasks.probe import (BiLSTM, ProbeConfig, SplitFeatures, load_upstream, reverse_valid, run_probe,
                                   train_sid_probe)
from ctc_fixtures import make_tone_corpus
from test_interop_common import save_model, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def test_reverse_valid_reverses_each_utterance_within_its_length():
    x = torch.arange(2 * 5, dtype=torch.float32).view(2, 5, 1)
    lengths = torch.tensor([5, 3])
    y = reverse_valid(x, lengths)
    assert y[:, :, 0].tolist() == [[4, 3, 2, 1, 0], [7, 6, 5, 8, 9]]
    assert torch.equal(reverse_valid(y, lengths), x)


def test_bilstm_equals_a_packed_bidirectional_lstm_at_the_valid_frames():
    torch.manual_seed(0)
    ref = nn.LSTM(6, 4, num_layers=2, batch_first=True, bidirectional=True)
    ours = BiLSTM(6, 4, layers=2, dropout=0.0)
    with torch.no_grad():
        for layer in range(2):
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                getattr(ours.forward_lstms[layer], f"{name}_l0").copy_(getattr(ref, f"{name}_l{layer}"))
                getattr(ours.backward_lstms[layer], f"{name}_l0").copy_(getattr(ref, f"{name}_l{layer}_reverse"))
    x = torch.randn(3, 7, 6)
    lengths = torch.tensor([7, 4, 2])
    packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    expected, _ = nn.utils.rnn.pad_packed_sequence(ref(packed)[0], batch_first=True, total_length=7)
    got = ours(x, lengths)
    for b, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(got[b, :n], expected[b, :n], atol=1e-6, rtol=1e-5)


def test_asr_probe_learns_the_tone_alphabet_from_fbank(tmp_path):
    """On the toy corpus (one tone per letter) a BiLSTM on log-mel frames learns to transcribe unseen
    sentences; the best checkpoint is chosen on valid and scored once on test."""
    manifest = make_tone_corpus(tmp_path / "tones", num_train=24)
    cfg = ProbeConfig(task="asr", updates=300, lr=5e-3, hidden=64, eval_interval=100, time_mask=0.0)
    result = run_probe(load_upstream("fbank"), manifest, cfg, log=lambda _: None)
    first = result["history"][0]["valid_cer"]
    assert result["valid_cer"] == min(h["valid_cer"] for h in result["history"])
    assert result["valid_cer"] < 10 and result["valid_cer"] < first
    assert result["test_cer"] < 15 and len(result["test_hypotheses"]) == 6
    assert len(result["layer_weights"]) == 2 and result["num_train"] == 24  # fbank: plain and standardized


def test_sid_probe_weights_the_state_that_carries_the_speaker():
    """Three hidden states, the speaker only in state 1: the learned layer weights pick it and the test
    accuracy is high; with the speaker nowhere, accuracy stays near chance (1/4)."""
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 8, generator=g) * 2

    def split(name: str, n: int, informative: bool) -> SplitFeatures:
        labels = [i % 4 for i in range(n)]
        states = []
        for y in labels:
            s = torch.randn(3, 8, generator=g)
            if informative:
                s[1] += centers[y]
            states.append(s)
        return SplitFeatures(name, states, labels)

    cfg = ProbeConfig(task="sid", updates=300, lr=1e-2, eval_interval=50, dropout=0.0)
    good = train_sid_probe(split("train", 80, True), split("valid", 40, True), split("test", 40, True), 4, cfg,
                           log=lambda _: None)
    assert int(np.argmax(good["layer_weights"])) == 1 and good["layer_weights"][1] > 0.5
    assert good["test_accuracy"] > 90
    bad = train_sid_probe(split("train", 80, False), split("valid", 40, False), split("test", 200, False), 4, cfg,
                          log=lambda _: None)
    assert bad["test_accuracy"] < 45


def _sid_manifest(root):
    """Speakers = tone pitch; train / valid / test of the same 3 speakers."""
    rng = np.random.default_rng(0)
    audio = root / "audio"
    audio.mkdir(parents=True)
    for split, n in (("train", 9), ("valid", 6), ("test", 6)):
        lines, spk = [str(audio)], []
        for i in range(n):
            k = i % 3
            t = np.arange(8000) / 16000
            x = 0.3 * np.sin(2 * np.pi * (200 + 400 * k) * t) + 0.02 * rng.standard_normal(len(t))
            sf.write(audio / f"{split}{i}.flac", x.astype(np.float32), 16000)
            lines.append(f"{split}{i}.flac\t{len(t)}")
            spk.append(f"s{k}")
        (root / f"{split}.tsv").write_text("\n".join(lines) + "\n")
        (root / f"{split}.spk").write_text("\n".join(spk) + "\n")
    (root / "dict.spk.txt").write_text("s0 3\ns1 3\ns2 3\n")
    return root


def test_probe_command_checkpoint_random_init_and_errors(tmp_path, capsys):
    manifest = _sid_manifest(tmp_path / "sid")
    ckpt = save_model(tmp_path / "up.pt", tiny_model())
    out = tmp_path / "out"
    args = ["probe", str(ckpt), str(manifest), "--task", "sid", "--updates", "60", "--eval-interval", "20",
            "--out", str(out)]
    assert main(args) == 0
    report = json.loads((out / "probe.json").read_text())
    assert report["upstream"].startswith("wav2vec2") and len(report["layer_weights"]) == 3  # input + 2 layers
    assert report["test_accuracy"] > 60 and "probe sid" in capsys.readouterr().out
    assert main(args) == 2 and "add --force" in capsys.readouterr().err  # never overwrites silently
    assert main(args + ["--force", "--random-init"]) == 0
    assert json.loads((out / "probe.json").read_text())["upstream"].startswith("random-init")
    # the architecture of a pretraining recipe, no checkpoint needed (the baseline before pretraining)
    recipe_args = ["probe", "recipes/wav2vec2_mel_tiny.yaml", str(manifest), "--task", "sid", "--updates", "20",
                   "--out", str(out), "--force"]
    assert main(recipe_args + ["--random-init"]) == 0
    assert json.loads((out / "probe.json").read_text())["upstream"] == "random-init wav2vec2"
    assert len(json.loads((out / "probe.json").read_text())["layer_weights"]) == 7  # input + 6 layers
    assert main(recipe_args) == 2 and "add --random-init" in capsys.readouterr().err
    assert main(["probe", "fbank", str(manifest), "--task", "asr"]) == 1
    assert "dict.ltr.txt" in capsys.readouterr().err  # names the missing file
    assert main(["probe", str(tmp_path / "nope.pt"), str(manifest), "--task", "sid"]) == 2
    assert "file not found" in capsys.readouterr().err
