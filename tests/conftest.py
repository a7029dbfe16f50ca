"""Shared test settings."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    # Tiny tensors: a second intra-op thread only adds synchronisation (measured: a 32 px forward
    # went from 2 ms to 0.4 s when the other core was busy).
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
