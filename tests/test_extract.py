"""``speechssl extract``: per-utterance layer-wise features, memory-mapped, sharded, resumable."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch

from speechssl.cli import main
from speechssl.interop.extract import LayerFeatures, parse_layers
from speechssl.features.store import FeatureStoreError

from test_interop_common import features, save_ctc, save_model, tiny_ctc, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")
LENGTHS = [8000, 5200, 12000, 3300, 6100]


@pytest.fixture
def corpus(tmp_path):
    audio = tmp_path / "audio"
    audio.mkdir()
    rng = np.random.default_rng(0)
    lines = [str(audio)]
    for i, n in enumerate(LENGTHS):
        sf.write(audio / f"u{i}.wav", (0.1 * rng.standard_normal(n)).astype(np.float32), 16000, subtype="FLOAT")
        lines.append(f"u{i}.wav\t{n}")
    manifest = tmp_path / "manifest"
    manifest.mkdir()
    (manifest / "dev.tsv").write_text("\n".join(lines) + "\n")
    return manifest, audio


def expected(model, audio, i, layers):
    wave, _ = sf.read(audio / f"u{i}.wav", dtype="float32")
    out = features(model, torch.from_numpy(wave)[None], None)
    return np.stack([out["layer_results"][layer - 1][0].numpy() for layer in layers])


def test_all_layers_one_shard(tmp_path, corpus, capsys):
    manifest, audio = corpus
    model = tiny_model("wav2vec2", "large")
    ckpt = save_model(tmp_path / "m.pt", model)
    out = tmp_path / "feats"
    args = ["extract", str(ckpt), str(manifest), "--split", "dev", "--layers", "all", "--out", str(out),
            "--num-workers", "0"]
    assert main(args) == 0
    feats = LayerFeatures.open(out, "dev")
    assert feats.layers == [1, 2] and len(feats) == len(LENGTHS)
    for i in range(len(LENGTHS)):
        x = feats.utterance(i)
        assert x.shape == (2, int(model.feature_extractor.output_lengths(torch.tensor(LENGTHS[i]))), 48)
        assert np.abs(x - expected(model, audio, i, [1, 2])).max() < 1e-5
    assert isinstance(feats.features.shards[0].data, np.memmap)
    assert main(args) == 0 and "already done" in capsys.readouterr().out  # finished shard skipped


def test_selected_layers_sharded_from_a_ctc_checkpoint(tmp_path, corpus):
    manifest, audio = corpus
    ctc, cfg = tiny_ctc("hubert", "base")
    ckpt = save_ctc(tmp_path / "ctc.pt", ctc, cfg)
    out = tmp_path / "feats"
    for shard in (1, 0):
        assert main(["extract", str(ckpt), str(manifest), "--split", "dev", "--layers", "2", "--out", str(out),
                     "--nshard", "2", "--shard", str(shard), "--num-workers", "0"]) == 0
    feats = LayerFeatures.open(out, "dev")
    assert feats.layers == [2] and len(feats.features.shards) == 2
    for i in range(len(LENGTHS)):
        assert np.abs(feats.utterance(i) - expected(ctc.w2v_model, audio, i, [2])).max() < 1e-5


def test_bad_layers(tmp_path, corpus, capsys):
    manifest, _ = corpus
    ckpt = save_model(tmp_path / "m.pt", tiny_model())
    assert main(["extract", str(ckpt), str(manifest), "--split", "dev", "--layers", "3", "--out",
                 str(tmp_path / "f")]) == 1
    assert "give distinct layers in 1..2" in capsys.readouterr().err
    assert parse_layers("2,1", 4) == [1, 2] and parse_layers("ALL", 3) == [1, 2, 3]
    for bad in ("1,1", "x", "0", ""):
        with pytest.raises(FeatureStoreError):
            parse_layers(bad, 4)


def test_evaluate_extract_and_features_layer_normalise_as_their_checkpoint(tmp_path, corpus):
    """Item 4 of issue 13 at inference: evaluate, extract and features layer have one source for
    task.normalize, the checkpoint they load (for a fine-tuned one its upstream's: fine-tuning refuses any
    other value), and apply it, here true: features and transcripts are those of the normalised audio."""
    from speechssl.data.dataset import normalize_wave
    from speechssl.decode.greedy import greedy_decode
    from speechssl.tasks.ctc_eval import evaluate_ctc
    from speechssl.features.store import FeatureSet
    from speechssl.text.vocab import Vocabulary

    from test_interop_common import VOCAB

    manifest, audio = corpus
    waves = [sf.read(audio / f"u{i}.wav", dtype="float32")[0] for i in range(len(LENGTHS))]
    normed = [torch.from_numpy(normalize_wave(w)) for w in waves]
    assert all(np.abs(n.numpy() - w).max() > 0.1 for n, w in zip(normed, waves))  # normalising changes the input

    model = tiny_model("wav2vec2", "large")
    ckpt = save_model(tmp_path / "m.pt", model, normalize=True)
    assert main(["extract", str(ckpt), str(manifest), "--split", "dev", "--layers", "2", "--out",
                 str(tmp_path / "x"), "--num-workers", "0"]) == 0
    assert main(["features", "layer", str(manifest), "--split", "dev", "--ckpt", str(ckpt), "--layer", "2",
                 "--out", str(tmp_path / "l"), "--num-workers", "0"]) == 0
    extracted, layer = LayerFeatures.open(tmp_path / "x", "dev"), FeatureSet.open(tmp_path / "l", "dev")
    assert layer.meta["settings"]["normalize"] is True
    for i, n in enumerate(normed):
        ref = features(model, n[None], None)["layer_results"][1][0].numpy()
        assert np.abs(extracted.utterance(i)[0] - ref).max() < 1e-5
        assert np.abs(layer.utterance(i) - ref).max() < 1e-5

    ctc, cfg = tiny_ctc("wav2vec2", "large")
    ckpt = save_ctc(tmp_path / "ctc.pt", ctc, cfg, normalize=True)
    (manifest / "dev.wrd").write_text("".join("EAT\n" for _ in LENGTHS))
    evaluate_ctc(ckpt, manifest, "dev", tmp_path / "eval", device="cpu", quiet=True)
    vocab = Vocabulary(VOCAB, "letter")
    with torch.no_grad():
        expected_hyps = [vocab.decode(greedy_decode(ctc(n[None])["logits"])[0]) for n in normed]
    assert (tmp_path / "eval" / "hyp.wrd").read_text().splitlines() == expected_hyps
