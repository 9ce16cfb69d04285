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
