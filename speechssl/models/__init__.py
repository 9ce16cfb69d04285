"""Models: wav2vec 2.0, HuBERT and data2vec 2.0 (which share wav2vec 2.0's building blocks).

``build_model(cfg.model)`` is what the trainer calls; the ``*_config()`` functions spell out the
published configurations as :class:`~speechssl.config.ModelConfig` objects.
"""

from __future__ import annotations

from torch import nn

from speechssl.config import ModelConfig
from speechssl.models.data2vec2 import (
    Data2Vec2Model,
    data2vec2_base,
    data2vec2_base_config,
    data2vec2_large,
    data2vec2_large_config,
    data2vec2_tiny,
    data2vec2_tiny_config,
)
from speechssl.models.hubert import (
    HubertModel,
    hubert_base,
    hubert_base_config,
    hubert_large,
    hubert_large_config,
    hubert_tiny,
    hubert_tiny_config,
)
from speechssl.models.wav2vec2 import (
    Wav2Vec2Model,
    wav2vec2_base,
    wav2vec2_base_config,
    wav2vec2_large,
    wav2vec2_large_config,
    wav2vec2_tiny,
    wav2vec2_tiny_config,
)

MODEL_NAMES = ("wav2vec2", "hubert", "data2vec2")


def build_model(cfg: ModelConfig) -> nn.Module:
    """The model named by ``cfg.name`` (``model.name`` in a recipe), built from ``cfg``."""
    if cfg.name == "wav2vec2":
        return Wav2Vec2Model(cfg)
    if cfg.name == "hubert":
        return HubertModel(cfg)
    if cfg.name == "data2vec2":
        return Data2Vec2Model(cfg)
    raise ValueError(f"unknown model.name '{cfg.name}'; available: {', '.join(MODEL_NAMES)}")


__all__ = [
    "Data2Vec2Model",
    "HubertModel",
    "MODEL_NAMES",
    "Wav2Vec2Model",
    "build_model",
    "data2vec2_base",
    "data2vec2_base_config",
    "data2vec2_large",
    "data2vec2_large_config",
    "data2vec2_tiny",
    "data2vec2_tiny_config",
    "hubert_base",
    "hubert_base_config",
    "hubert_large",
    "hubert_large_config",
    "hubert_tiny",
    "hubert_tiny_config",
    "wav2vec2_base",
    "wav2vec2_base_config",
    "wav2vec2_large",
    "wav2vec2_large_config",
    "wav2vec2_tiny",
    "wav2vec2_tiny_config",
]
