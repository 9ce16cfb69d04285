"""HuBERT iteration-2+ features: the output of one transformer layer of a trained model (50 frames/s).

As fairseq's ``examples/hubert/simple_kmeans/dump_hubert_feature.py``: the model is built from the
checkpoint's own config, run in eval mode without masking on one utterance at a time (no padding, so
no padding effects on the extractor's group norm), in fp32, and long utterances are cut into chunks of
``max_chunk`` samples (100 s at 16 kHz) whose outputs are concatenated. ``task.normalize`` of the
checkpoint's config is honoured (per-utterance zero mean / unit variance, before chunking).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from speechssl.features.store import FeatureStoreError


def _resolve_device(device: str) -> torch.device:
    """``auto``: ``cuda:LOCAL_RANK`` (torchrun) or ``cuda`` when there is a GPU, else the CPU."""
    import os

    if device != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


class LayerExtractor:
    """Layer ``layer`` (1-based, as fairseq's ``output_layer``) of the model in ``ckpt``, a checkpoint
    written by the speechssl trainer (``model`` state dict + ``config``). See
    :class:`speechssl.features.mfcc.MfccExtractor` for the interface."""

    kind = "layer"

    def __init__(self, ckpt: str | Path, layer: int, device: str = "auto", max_chunk: int = 1_600_000):
        from speechssl.config import config_from_dict
        from speechssl.models import build_model
        from speechssl.train.checkpoint import load_checkpoint

        self.ckpt = Path(ckpt)
        state = load_checkpoint(self.ckpt)
        if not isinstance(state, dict) or "model" not in state or "config" not in state:
            keys = ", ".join(sorted(state)) if isinstance(state, dict) else type(state).__name__
            raise FeatureStoreError(f"{ckpt}: not a speechssl training checkpoint (has {keys}); expected the "
                                    "'model' and 'config' entries that 'speechssl pretrain' writes")
        cfg = config_from_dict(state["config"], source=str(ckpt))
        n_layers = cfg.model.encoder_layers
        if not 1 <= layer <= n_layers:
            raise FeatureStoreError(f"--layer {layer}: the model in {ckpt} has layers 1..{n_layers}")
        self.model = build_model(cfg.model)
        self.model.load_state_dict(state["model"])
        self.device = _resolve_device(device)
        self.model.eval().to(self.device)
        self.layer = layer
        self.max_chunk = max_chunk
        self.sample_rate = cfg.task.sample_rate
        self.normalize = cfg.task.normalize
        self.dim = cfg.model.encoder_embed_dim
        self.stride = self.model.feature_extractor.stride
        self.rate = self.sample_rate / self.stride  # 50 frames/s for the published front-ends at 16 kHz
        # shortest input giving one frame (the receptive field: 400 samples for BASE and for log-mel)
        frames = self.model.feature_extractor.output_lengths(torch.arange(1 << 16))
        self.min_len = int(torch.nonzero(frames >= 1)[0])
        if max_chunk < self.min_len:
            raise FeatureStoreError(f"--max-chunk {max_chunk} is below the model's receptive field ({self.min_len})")
        self.model_name = cfg.model.name
        self.num_updates = int(state.get("num_updates", -1))

    def settings(self) -> dict[str, Any]:
        return {"checkpoint": str(self.ckpt.resolve()), "num_updates": self.num_updates, "model": self.model_name,
                "layer": self.layer, "max_chunk": self.max_chunk, "normalize": self.normalize}

    def _chunks(self, n: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Utterances of ``n`` samples -> (full chunks, their length, last chunk length): every chunk is
        ``max_chunk`` long except the last, which absorbs a remainder shorter than the receptive field."""
        full, rem = np.divmod(np.asarray(n, dtype=np.int64), self.max_chunk)
        merge = (rem < self.min_len) & (full > 0)
        return np.where(merge, full - 1, full), np.full_like(full, self.max_chunk), np.where(merge, rem + self.max_chunk, rem)

    def num_frames(self, num_samples: np.ndarray) -> np.ndarray:
        full, size, last = self._chunks(num_samples)
        out = self.model.feature_extractor.output_lengths
        return (full * out(torch.from_numpy(size)).numpy() + out(torch.from_numpy(last)).numpy()).astype(np.int64)

    def prepare(self, wave: np.ndarray) -> torch.Tensor:
        if self.normalize:
            from speechssl.data.dataset import normalize_wave

            wave = normalize_wave(wave)
        return torch.from_numpy(np.ascontiguousarray(wave, dtype=np.float32))

    @torch.inference_mode()
    def compute(self, wave: torch.Tensor) -> np.ndarray:
        """``(time,)`` -> ``(frames, dim)`` float32."""
        full, size, last = (int(v[0]) for v in self._chunks(np.array([len(wave)])))
        bounds = [i * size for i in range(full + 1)] + ([full * size + last] if last else [])
        x = wave.to(self.device)
        outs = [self.model(x[None, a:b], None, mask=False, features_only=True, output_layer=self.layer)["x"][0]
                for a, b in zip(bounds[:-1], bounds[1:]) if b - a >= self.min_len]
        if not outs:
            return np.zeros((0, self.dim), dtype=np.float32)
        return torch.cat(outs).float().cpu().numpy()
