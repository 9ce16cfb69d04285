"""ONNX export: onnxruntime output == speechssl (PyTorch, eval mode) for other batch sizes and lengths
than the export example; no dropout / LayerDrop / masking (no random ops) in the graph."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from speechssl.cli import main
from speechssl.interop.common import load_speechssl
from speechssl.interop.onnx import inference_graph

from test_interop_common import TOL, VOCAB, features, max_diff, padded_batch, save_ctc, save_model, tiny_ctc, tiny_model

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.usefixtures("one_thread")

RANDOM_OPS = {"Dropout", "RandomUniform", "RandomNormal", "RandomUniformLike", "RandomNormalLike", "Bernoulli",
              "Multinomial"}


def session(folder):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(folder / "model.onnx"), opts, providers=["CPUExecutionProvider"])


def check_graph(folder):
    graph = onnx.load(str(folder / "model.onnx")).graph
    onnx.checker.check_model(onnx.load(str(folder / "model.onnx")))
    assert not {n.op_type for n in graph.node} & RANDOM_OPS
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    assert dims == {"source": ["batch", "samples"], "lengths": ["batch"]}


@pytest.mark.parametrize("name,style,normalize", [("wav2vec2", "base", False), ("hubert", "large", True)])
def test_encoder(tmp_path, name, style, normalize):
    # training-time randomness switched on in the config: none of it may reach the graph
    model = tiny_model(name, style, encoder_layerdrop=0.5, dropout=0.2, mask_prob=0.5, mask_channel_prob=0.3)
    ckpt = save_model(tmp_path / "m.pt", model, normalize=normalize)
    out = tmp_path / "onnx"
    assert main(["export", str(ckpt), "--to", "onnx", "--out", str(out)]) == 0
    check_graph(out)
    meta = json.loads((out / "config.json").read_text())
    assert meta["outputs"] == ["hidden", "frame_lengths"] and meta["normalize"] == normalize
    sess = session(out)
    for lengths in ((9000, 6400, 4000, 1200), (5000,)):  # batch 4 and 1, lengths unlike the export example
        source, padding_mask, lengths_t = padded_batch(lengths)
        if normalize:  # the graph normalises each row over its valid samples, as task.normalize does
            from speechssl.data.dataset import normalize_wave

            ref_source = torch.stack([torch.cat([torch.from_numpy(normalize_wave(s[:n].numpy())),
                                                 torch.zeros(len(s) - n)]) for s, n in zip(source, lengths_t)])
        else:
            ref_source = source
        ours = features(model, ref_source, padding_mask)
        hidden, frames = sess.run(None, {"source": source.numpy(), "lengths": lengths_t.numpy()})
        pad = ours["padding_mask"]
        valid = ~pad if pad is not None else torch.ones(hidden.shape[:2], dtype=torch.bool)
        assert np.array_equal(frames, valid.sum(1).numpy())
        assert max_diff(hidden, ours["x"], valid) < TOL


def test_ctc_logits(tmp_path):
    ctc, cfg = tiny_ctc("wav2vec2", "large")
    ckpt = save_ctc(tmp_path / "ctc.pt", ctc, cfg)
    out = tmp_path / "onnx"
    assert main(["export", str(ckpt), "--to", "onnx", "--out", str(out)]) == 0
    check_graph(out)
    assert json.loads((out / "config.json").read_text())["vocab"] == VOCAB
    source, padding_mask, lengths = padded_batch((7000, 3000))
    with torch.no_grad():
        ours = ctc(source, padding_mask)
    hidden, frames, logits = session(out).run(None, {"source": source.numpy(), "lengths": lengths.numpy()})
    valid = ~ours["padding_mask"]
    assert max_diff(logits, ours["logits"], valid) < TOL
    assert np.array_equal(frames, ours["lengths"].numpy())


def test_inference_graph_matches_model_in_pytorch(tmp_path):
    """The export-friendly forward itself equals the model (before any ONNX conversion)."""
    model = tiny_model("wav2vec2", "base")
    loaded = load_speechssl(save_model(tmp_path / "m.pt", model))
    source, padding_mask, lengths = padded_batch()
    with torch.no_grad():
        hidden, frames = inference_graph(loaded)(source, lengths)
    ours = features(model, source, padding_mask)
    assert max_diff(hidden, ours["x"], ~ours["padding_mask"]) < 1e-5
