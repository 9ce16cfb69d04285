"""Shared helpers (no tests) for the data / trainer / pretrain tests: tiny corpora, tiny recipes, a toy model.

The toy model follows the trainer's interface (``set_num_updates``, an objective returning ``loss`` as a
SUM over ``sample_size`` frames and ``logs``) and uses dropout and a random frame mask drawn from the
global torch RNG, so tests can check that the trainer makes that randomness reproducible.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import soundfile as sf
import torch
import yaml
from torch import nn

SR = 16000


def make_corpus(root: Path, lengths: dict[str, Sequence[int]], sample_rate: int = SR, seed: int = 0,
                ext: str = "flac") -> Path:
    """Write ``<split>.tsv`` manifests under ``root/manifest`` for sine+noise files of the given lengths."""
    rng = np.random.default_rng(seed)
    audio, man = root / "audio", root / "manifest"
    audio.mkdir(parents=True, exist_ok=True)
    man.mkdir(parents=True, exist_ok=True)
    for split, lens in lengths.items():
        lines = [str(audio)]
        for i, n in enumerate(lens):
            t = np.arange(n) / sample_rate
            x = 0.3 * np.sin(2 * np.pi * (150 + 40 * (i % 7)) * t) + 0.05 * rng.standard_normal(n)
            name = f"{split}_{i:03d}.{ext}"
            sf.write(audio / name, x.astype(np.float32), sample_rate)
            lines.append(f"{name}\t{n}")
        (man / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return man


def tiny_recipe(path: Path, base: str = "wav2vec2_base.yaml", model_config=None, **sections: dict[str, Any]) -> Path:
    """A recipe extending ``base`` with a tiny test model (default: wav2vec 2.0's) and fast CPU settings."""
    from speechssl.config import _to_plain
    from speechssl.models import wav2vec2_tiny_config

    rec: dict[str, Any] = {
        "base": base,
        "model": _to_plain(dataclasses.asdict(model_config or wav2vec2_tiny_config())),
        "common": {"fp16": False, "log_interval": 2, "log_format": "simple", "seed": 3},
        "task": {"max_sample_size": 12000, "min_sample_size": 4000},
        "dataset": {"max_tokens": 24000, "num_workers": 0, "validate_interval": 1},
        "distributed_training": {"distributed_world_size": 1},
        "optimization": {"max_update": 6, "lr": 2e-3},
        "lr_scheduler": {"warmup_updates": 2},
        "checkpoint": {"save_interval_updates": 3, "keep_interval_updates": 2},
    }
    for sec, body in sections.items():
        rec.setdefault(sec, {}).update(body)
    path.write_text(yaml.safe_dump(rec))
    return path


# --------------------------------------------------------------------------------------------------
# toy model / objective
# --------------------------------------------------------------------------------------------------


class ToyModel(nn.Module):
    """(B, T) waveform -> (B, T/80, 8) frames; 1-d params: biases, LayerNorm, mask embedding."""

    def __init__(self, dropout: float = 0.1):
        super().__init__()
        self.conv = nn.Conv1d(1, 8, kernel_size=80, stride=80)
        self.norm = nn.LayerNorm(8)
        self.proj = nn.Linear(8, 8)
        self.mask_emb = nn.Parameter(torch.zeros(8).uniform_())
        self.dropout = nn.Dropout(dropout)
        self.num_updates_seen: list[int] = []

    def set_num_updates(self, n: int) -> None:
        self.num_updates_seen.append(n)

    def forward(self, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        feats = self.norm(self.conv(source[:, None]).transpose(1, 2))
        mask = torch.rand(feats.shape[:2], device=feats.device) < 0.5
        x = torch.where(mask[..., None], self.mask_emb.to(feats.dtype), feats)
        return self.proj(self.dropout(x)), feats.detach(), mask


@dataclass
class ToyOutput:
    loss: torch.Tensor
    sample_size: torch.Tensor
    logs: dict[str, Any] = field(default_factory=dict)


class ToyObjective:
    """Squared error predicting the (detached) features at masked frames; SUM over masked frames.

    ``nan_at``: global call numbers whose loss is NaN (to test the non-finite handling)."""

    def __init__(self, nan_at: Sequence[int] = ()):
        self.nan_at = set(nan_at)
        self.calls = 0

    def __call__(self, model: nn.Module, batch: dict[str, Any]) -> ToyOutput:
        pred, target, mask = model(batch["source"])
        err = ((pred.float() - target.float()) ** 2).sum(-1)
        n = mask.sum()
        loss = (err * mask).sum()
        if self.calls in self.nan_at:
            loss = loss * float("nan")
        self.calls += 1
        return ToyOutput(loss=loss, sample_size=n, logs={"mse": (loss.detach() / n.clamp(min=1)), "num_masked": n})


def toy_batch(batch_size: int = 2, length: int = 1600, seed: int = 0) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    src = torch.randn(batch_size, length, generator=g)
    return {"source": src, "padding_mask": None, "audio_samples": batch_size * length}


def toy_config(**overrides: Any):
    """A Config for Trainer unit tests (no data needed)."""
    from speechssl.config import load_config

    items = {"optimization.max_update": 100, "optimization.lr": 0.01, "lr_scheduler.name": "fixed",
             "optimizer.weight_decay": 0.0, "common.seed": 5, **overrides}
    return load_config(None, [f"{k}={v}" for k, v in items.items()])


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def load_model_state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def assert_states_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: Optional[float] = None) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if atol is None:
            assert torch.equal(a[k], b[k]), f"{k} differs (max abs diff {(a[k].float() - b[k].float()).abs().max()})"
        else:
            torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=lambda m, k=k: f"{k}: {m}")
