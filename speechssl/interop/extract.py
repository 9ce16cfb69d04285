"""``speechssl extract``: per-utterance, layer-wise encoder features for downstream tools (SUPERB-style).

Every requested Transformer layer's output (1-based, as fairseq's ``layer_results``; no final
LayerNorm) of the upstream in any speechssl checkpoint (pretraining, CTC fine-tuned, imported) is
stored in :mod:`speechssl.features.store`'s sharded, memory-mappable layout: shard ``i`` of ``n`` is
``<split>_<i>_<n>.npy`` float32 ``(frames, n_layers * D)`` (utterances concatenated in manifest order;
each frame row holds the layers one after the other), ``.len`` (frames per utterance) and ``.json``
(``settings.layers`` lists the layers, ``settings.layer_dim`` is ``D``). Reading it back::

    feats = LayerFeatures.open("feats/w2v_layers", "dev")
    x = feats.utterance(3)        # (n_layers, frames, D) view into the memory map (no copy)
    feats.layers                  # [1, 2, ...] the layer number of each row of x

As ``speechssl features layer``: eval mode, no masking, one utterance at a time (no padding), long
utterances in chunks of ``--max-chunk`` samples, ``task.normalize`` honoured, finished shards skipped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from speechssl.features.layer import LayerExtractor, _resolve_device
from speechssl.features.store import FeatureSet, FeatureStoreError


def parse_layers(text: str, num_layers: int) -> list[int]:
    """``"all"`` or ``"L1,L2,..."`` (1-based, any order, no repeats) -> sorted layer numbers."""
    if text.strip().lower() == "all":
        return list(range(1, num_layers + 1))
    try:
        layers = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise FeatureStoreError(f"--layers {text!r}: expected 'all' or comma-separated layer numbers") from None
    bad = [v for v in layers if not 1 <= v <= num_layers]
    if not layers or bad or len(set(layers)) != len(layers):
        raise FeatureStoreError(f"--layers {text!r}: give distinct layers in 1..{num_layers}")
    return sorted(layers)


class MultiLayerExtractor(LayerExtractor):
    """Outputs of ``layers`` of any speechssl checkpoint's upstream, ``(frames, len(layers) * D)``.

    Shares :class:`~speechssl.features.layer.LayerExtractor`'s chunking and frame counting; loads with
    :func:`speechssl.interop.common.load_speechssl` so CTC and imported checkpoints work too.
    """

    kind = "layers"

    def __init__(self, ckpt: str | Path, layers: str, device: str = "auto", max_chunk: int = 1_600_000):
        from speechssl.interop.common import load_speechssl

        self.ckpt = Path(ckpt)
        loaded = load_speechssl(self.ckpt)
        cfg = loaded.cfg
        self.model = loaded.upstream
        self.layers = parse_layers(layers, cfg.model.encoder_layers)
        self.device = _resolve_device(device)
        self.model.eval().to(self.device)
        self.max_chunk = max_chunk
        self.sample_rate = cfg.task.sample_rate
        self.normalize = cfg.task.normalize
        self.layer_dim = cfg.model.encoder_embed_dim
        self.dim = self.layer_dim * len(self.layers)
        spec = [tuple(s) for s in cfg.model.conv_feature_layers]
        self.rate = self.sample_rate / float(np.prod([s for _, _, s in spec]))
        self.min_len = 1
        for _, k, s in reversed(spec):
            self.min_len = (self.min_len - 1) * s + k
        if max_chunk < self.min_len:
            raise FeatureStoreError(f"--max-chunk {max_chunk} is below the model's receptive field ({self.min_len})")
        self.model_name = cfg.model.name
        self.num_updates = loaded.num_updates

    def settings(self) -> dict[str, Any]:
        return {"checkpoint": str(self.ckpt.resolve()), "num_updates": self.num_updates, "model": self.model_name,
                "layers": self.layers, "layer_dim": self.layer_dim, "max_chunk": self.max_chunk,
                "normalize": self.normalize}

    @torch.inference_mode()
    def compute(self, wave: torch.Tensor) -> np.ndarray:
        """``(time,)`` -> ``(frames, len(layers) * D)`` float32."""
        full, size, last = (int(v[0]) for v in self._chunks(np.array([len(wave)])))
        bounds = [i * size for i in range(full + 1)] + ([full * size + last] if last else [])
        x = wave.to(self.device)
        outs = []
        for a, b in zip(bounds[:-1], bounds[1:]):
            if b - a < self.min_len:
                continue
            res = self.model(x[None, a:b], None, mask=False, features_only=True,
                             output_layer=self.layers[-1])["layer_results"]
            outs.append(torch.cat([res[i - 1][0] for i in self.layers], dim=-1))
        if not outs:
            return np.zeros((0, self.dim), dtype=np.float32)
        return torch.cat(outs).float().cpu().numpy()


class LayerFeatures:
    """Reader of ``speechssl extract`` output: per-utterance ``(layers, frames, D)`` memory-mapped views."""

    def __init__(self, features: FeatureSet):
        settings = features.meta.get("settings") or {}
        if features.meta.get("kind") != MultiLayerExtractor.kind or "layers" not in settings:
            raise FeatureStoreError("not 'speechssl extract' output (kind != layers)")
        self.features = features
        self.layers: list[int] = list(settings["layers"])
        self.layer_dim = int(settings["layer_dim"])
        self.lengths = features.lengths

    @classmethod
    def open(cls, folder: str | Path, split: str, nshard: Optional[int] = None) -> "LayerFeatures":
        return cls(FeatureSet.open(folder, split, nshard))

    def __len__(self) -> int:
        return len(self.lengths)

    def utterance(self, index: int) -> np.ndarray:
        frames = self.features.utterance(index)  # (n, layers * D)
        return frames.reshape(frames.shape[0], len(self.layers), self.layer_dim).transpose(1, 0, 2)

