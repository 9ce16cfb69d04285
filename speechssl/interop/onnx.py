"""ONNX export of the encoder (and CTC head) for inference, with dynamic batch and length.

The graph is :class:`InferenceGraph`: the upstream's eval-mode computation written with export-friendly
ops (``conv1d`` in channels-first layout instead of the training-time strided-matmul kernel, integer
frame-length arithmetic, the Transformer layers themselves). Training-only randomness is absent by
construction: no dropout (eval modules are identities and are traced away), no LayerDrop (every
layer runs), no time/channel masking. Inputs and outputs::

    source   float32 (batch, samples)   zero-padded waveforms
    lengths  int64   (batch,)           valid samples of each row
    ->
    hidden   float32 (batch, frames, D)  encoder output (padded frames: unspecified values)
    frame_lengths int64 (batch,)         valid frames of each row
    logits   float32 (batch, frames, V)  CTC models only: output-layer scores (blank = index 0)

``frame_lengths`` follow the model's frame padding rule (``model.frame_padding``: fairseq's
``all_samples`` for HuBERT, the conv output length for wav2vec 2.0).
``task.normalize`` models (wav2vec 2.0 LARGE-LV60) normalise each row over its valid samples inside
the graph. The folder also gets ``config.json`` (inputs, outputs, sample rate, vocabulary).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from speechssl.interop.common import InteropError, Loaded, export_dir
from speechssl.models.wav2vec2 import frame_padding_rule


class InferenceGraph(nn.Module):
    """``(source (B, T), lengths (B,)) -> (hidden (B, L, D), frame_lengths (B,)[, logits (B, L, V)])``.

    Same values as ``upstream(source, padding_mask, mask=False, features_only=True)["x"]`` in eval
    mode (and ``proj`` of it for CTC), where ``padding_mask`` marks samples at or beyond ``lengths``.
    """

    def __init__(self, upstream: nn.Module, proj: Optional[nn.Linear] = None, normalize: bool = False):
        super().__init__()
        self.upstream = upstream.eval()
        self.proj = proj
        self.normalize = normalize
        self.spec = list(upstream.feature_extractor.spec)
        self.all_samples = frame_padding_rule(upstream.cfg) == "all_samples"

    def _normalize(self, source: Tensor, valid: Tensor, lengths: Tensor) -> Tensor:
        n = lengths.to(source.dtype)[:, None]
        mean = (source * valid).sum(1, keepdim=True) / n
        var = (((source - mean) * valid) ** 2).sum(1, keepdim=True) / n
        return (source - mean) / torch.sqrt(var + 1e-5) * valid

    def _conv_features(self, source: Tensor) -> Tensor:
        x = source.unsqueeze(1)  # (B, 1, T)
        for block in self.upstream.feature_extractor.conv_layers:
            x = F.conv1d(x, block.conv.weight, block.conv.bias, stride=block.conv.stride[0])
            if block.norm_type == "group":
                x = block.norm(x)
            elif block.norm_type == "layer":
                x = block.norm(x.transpose(1, 2)).transpose(1, 2)
            x = F.gelu(x)
        return x.transpose(1, 2)  # (B, L, C)

    def forward(self, source: Tensor, lengths: Tensor):
        T = source.shape[1]
        valid = (torch.arange(T, device=source.device)[None, :] < lengths[:, None]).to(source.dtype)
        if self.normalize:
            source = self._normalize(source, valid, lengths)
        features = self._conv_features(source)
        L = features.shape[1]
        if self.all_samples:  # HuBERT (fairseq): a frame is padding iff all of its T // L samples are
            window = T // L
            frames = torch.div(lengths + window - 1, window, rounding_mode="floor").clamp(max=L)
        else:  # conv output length of the valid samples
            frames = lengths
            for _, kernel, stride in self.spec:
                frames = torch.div(frames - kernel, stride, rounding_mode="floor") + 1
            frames = frames.clamp(min=0)
        pad = torch.arange(L, device=source.device)[None, :] >= frames[:, None]  # (B, L) True = padded
        proj = self.upstream.feature_projection
        x = proj.layer_norm(features)
        if proj.projection is not None:
            x = proj.projection(x)
        enc = self.upstream.encoder
        x = x.masked_fill(pad.unsqueeze(-1), 0.0)
        x = x + enc.pos_conv(x)
        if not enc.layer_norm_first:
            x = enc.layer_norm(x)
        for layer in enc.layers:
            x = layer(x, pad)
        if enc.layer_norm_first:
            x = enc.layer_norm(x)
        if self.proj is None:
            return x, frames
        return x, frames, self.proj(x)


def inference_graph(loaded: Loaded) -> InferenceGraph:
    proj = loaded.model.proj if loaded.is_ctc else None
    return InferenceGraph(loaded.upstream, proj, loaded.cfg.task.normalize).eval()


def export_onnx(loaded: Loaded, out: str | Path, force: bool = False, opset: int = 17) -> Path:
    """Write ``model.onnx`` and ``config.json`` into the folder ``out``; returns the model path."""
    if loaded.cfg.model.name == "data2vec2":
        raise InteropError("ONNX export covers wav2vec 2.0 and HuBERT encoders; data2vec 2.0's (positional "
                           "convolution stack, ALiBi) is not exported yet: use it from speechssl, or --to hf for a "
                           "data2vec model without ALiBi")
    try:
        import onnx  # noqa: F401  (torch's exporter needs it)
    except ImportError:
        raise InteropError("ONNX export needs the onnx package: pip install 'speechssl[onnx]'") from None
    graph = inference_graph(loaded)
    # example input: two rows of different lengths, long enough for every conv layer
    min_len = 1
    for _, k, s in reversed(graph.spec):
        min_len = (min_len - 1) * s + k
    T = max(4 * min_len, loaded.cfg.task.sample_rate // 2)
    source = torch.zeros(2, T)
    lengths = torch.tensor([T, T - min_len], dtype=torch.int64)
    outputs = ["hidden", "frame_lengths"] + (["logits"] if loaded.is_ctc else [])
    axes: dict[str, Any] = {"source": {0: "batch", 1: "samples"}, "lengths": {0: "batch"},
                            "hidden": {0: "batch", 1: "frames"}, "frame_lengths": {0: "batch"}}
    if loaded.is_ctc:
        axes["logits"] = {0: "batch", 1: "frames"}
    meta = {"inputs": {"source": "float32 (batch, samples)", "lengths": "int64 (batch,)"},
            "outputs": outputs, "sample_rate": loaded.cfg.task.sample_rate, "normalize": loaded.cfg.task.normalize,
            "model_name": loaded.cfg.model.name, "frame_rate": loaded.cfg.task.sample_rate / _stride(graph.spec),
            "min_samples": min_len, "opset": opset}
    if loaded.is_ctc:
        meta["vocab"] = loaded.vocab
    with export_dir(out, force) as tmp:
        with torch.no_grad(), warnings.catch_warnings():
            # the TorchScript exporter (dynamic_axes; no onnxscript needed) is deprecated in favour of
            # torch.export, and traces GroupNorm's training-only batch-size check: both are harmless here
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            torch.onnx.export(graph, (source, lengths), str(tmp / "model.onnx"), input_names=["source", "lengths"],
                              output_names=outputs, dynamic_axes=axes, opset_version=opset, dynamo=False,
                              do_constant_folding=True)
        (tmp / "config.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return Path(out) / "model.onnx"


def _stride(spec) -> int:
    out = 1
    for _, _, s in spec:
        out *= s
    return out
