"""Fixtures shared by the whole suite."""

import pytest
import torch


@pytest.fixture
def one_thread():
    """Tiny tensors are dominated by per-op overhead, which OpenMP spin-waiting inflates when other
    processes share the cores; one torch thread keeps such tests fast and steady."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
