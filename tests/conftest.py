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


@pytest.fixture(autouse=True, scope="session")
def _private_mlflow_store(tmp_path_factory):
    # cssl_ray.experiments.train records every run in MLflow; without a URI it would write ./mlflow.db in the
    # checkout. Tests that check what was recorded pass their own --tracking-uri.
    import os
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    yield
    if old is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = old
