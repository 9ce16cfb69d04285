"""Shared pytest fixtures of the wav2vec 2.0 tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def single_thread():
    """Tiny models are dominated by per-op overhead, which OpenMP spin-waiting inflates many times when
    other processes share the cores; one thread keeps these tests fast and steady."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def perturb_affines(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every LayerNorm / GroupNorm a non-identity affine and every Linear / Conv1d bias non-zero values,
    in place; returns ``module``.

    Fresh models have weight 1 / bias 0 in their norms and zero biases in most Linear layers and the
    positional convolution (fairseq's init), so a reference comparison of fresh weights cannot see a norm
    or bias that is mapped to the wrong place or not at all. Perturb the source model before converting.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (torch.nn.LayerNorm, torch.nn.GroupNorm)) and m.weight is not None:
                m.weight.copy_(1.0 + 0.2 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
            elif isinstance(m, (torch.nn.Linear, torch.nn.Conv1d)) and m.bias is not None:
                m.bias.add_(0.1 * torch.randn(m.bias.shape, generator=g))
    return module
