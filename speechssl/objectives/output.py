"""What every training objective returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor


@dataclass
class LossOutput:
    """One batch's loss, fairseq convention.

    loss: fp32 scalar, a SUM over the ``sample_size`` units (masked frames for pretraining), so the
        trainer divides by the (all-reduced) ``sample_size`` to get the per-unit mean.
    sample_size: a Python int when the host knows it (e.g. from shapes), else an integer scalar tensor.
    logs: detached scalars (tensors or numbers) for logging; per-unit means unless named otherwise. Keep
        host values as Python numbers: a tensor made from one on a GPU (``torch.tensor(x, device=...)``)
        is a blocking copy that makes the host wait for the device.
    """

    loss: Tensor
    sample_size: Tensor | int
    logs: dict[str, Any] = field(default_factory=dict)
