"""A run's best weights as an MLflow PyTorch model: logged, registered, loaded back for ``predict``.

    log_model       best.pt (weights + config) -> the network rebuilt on the CPU from the config ->
                    ``mlflow.pytorch.log_model`` under the run: the pickled module, a signature
                    (float32 (-1, C, H, W) images -> float32 (-1, K, H, W) logits), one input example
                    (a zero image of the training size) and ``extra_files/config.yaml`` (the resolved
                    config: preprocessing and class count for ``predict``)
    register_model  a logged model -> a new version of a registered model (``models:/<name>/<version>``)
    load_model      ``models:/<name>/<version>`` (or ``models:/<model id>``, ``runs:/<run>/model``) ->
                    (Config, state dict), what ``predict.load_checkpoint`` returns for a best.pt

The pickled module refers to ``cssl_ray.models`` classes, so loading needs cssl_ray installed
(it is not on PyPI; the model's requirements list torch, timm and numpy at the versions it was
logged with). This module and ``tracking`` are the only ones that import ``mlflow``; the fluent
API is used only inside ``_active``, for the one call that needs an active run.
"""
from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

MODEL_NAME = "model"  # the logged model's name under its run (runs:/<run>/model)
CONFIG_FILE = "config.yaml"
MODEL_URI_TAG = "cssl.model_uri"  # set on the run that logged it: models:/<model id>
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no bars in the trainer's terminal


@contextlib.contextmanager
def _store(uri: str) -> Iterator[None]:
    """``uri`` as MLflow's global tracking and registry URI for the block (some calls, such as the
    registry resolving a ``models:/<id>`` source, read the global one whatever client is used)."""
    import mlflow

    previous = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous[0])
        mlflow.set_registry_uri(previous[1])


@contextlib.contextmanager
def _active(uri: str, run_id: str) -> Iterator[None]:
    """``run_id`` as the fluent active run of store ``uri`` for the block; the run's status is left
    to the caller (who ends its runs)."""
    import mlflow

    with _store(uri):
        mlflow.start_run(run_id=run_id)
        try:
            yield
        finally:
            mlflow.end_run("RUNNING")  # start_run set it RUNNING; the caller ends it


@contextlib.contextmanager
def _quiet(logger: str) -> Iterator[None]:
    """Only errors from ``logger`` for the block."""
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _requirements() -> list[str]:
    """The model's pip requirements, given so MLflow does not infer them (slow: a subprocess)."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for name in ("torch", "timm", "numpy"):
        try:
            out.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            out.append(name)
    return out


def log_model(uri: str, run_id: str, best_pt: str | Path) -> str:
    """Log ``best_pt``'s weights as the run's MLflow PyTorch model; returns its ``models:/`` URI."""
    import mlflow.pytorch
    import numpy as np
    import torch
    from mlflow.models import infer_signature

    from cssl_ray.config import dump_config, from_dict
    from cssl_ray.models import create_model
    from cssl_ray.run.checkpoint import load

    saved = load(best_pt, map_location="cpu")
    cfg = from_dict(dict(saved["config"]))
    model = create_model(cfg.model, cfg.data.in_channels, cfg.data.num_classes)
    model.load_state_dict(saved["model"])
    model.eval()
    h, w = cfg.data.image_size
    example = np.zeros((1, cfg.data.in_channels, h, w), dtype=np.float32)  # (1, C, H, W)
    with torch.no_grad():
        logits = model(torch.from_numpy(example)).numpy()  # (1, K, H, W)
    signature = infer_signature(example, logits)
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / CONFIG_FILE
        dump_config(cfg, config)
        # pickle, not pt2: torch.export costs ~7 s per model and not every network exports; MLflow's
        # warning that unpickling runs code says what predict's torch.load of a best.pt already implies
        with _active(uri, run_id), _quiet("mlflow.pytorch"):
            info = mlflow.pytorch.log_model(model, name=MODEL_NAME, signature=signature, input_example=example,
                                            extra_files=[str(config)], pip_requirements=_requirements(),
                                            serialization_format="pickle")
    return info.model_uri


def register_model(uri: str, model_uri: str, name: str, run_id: str) -> int:
    """A new version of registered model ``name`` (created if missing) from ``model_uri``; its number."""
    from mlflow.exceptions import MlflowException

    from cssl_ray.tracking.uri import client

    c = client(uri)
    try:
        c.create_registered_model(name, description="cssl_ray: the best model of an experiment, by validation")
    except MlflowException:
        pass  # it exists: add a version
    model_id = model_uri[len("models:/"):] if model_uri.startswith("models:/m-") else None
    with _store(uri):
        version = c.create_model_version(name, model_uri, run_id=run_id, model_id=model_id)
    return int(version.version)


def is_model_uri(text: str) -> bool:
    return str(text).startswith(("models:/", "runs:/"))


def load_model(model_uri: str, uri: str) -> tuple[Any, dict[str, Any]]:
    """(Config, state dict) of a logged model; ``ValueError`` (one line) when it cannot be read."""
    import mlflow.artifacts
    import mlflow.pytorch
    from mlflow.exceptions import MlflowException

    from cssl_ray.config import ConfigError, load_config
    from cssl_ray.tracking.uri import store_missing

    if store_missing(uri):
        raise ValueError(f"{model_uri}: no MLflow store at {uri} (pass --tracking-uri)")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            with _store(uri):
                local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=tmp))
        except (MlflowException, OSError) as e:
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ValueError(f"{model_uri}: cannot read this model from {uri} ({first})") from None
        config = next(iter(local.rglob(CONFIG_FILE)), None)
        if config is None:
            raise ValueError(f"{model_uri}: not a cssl_ray model (no extra_files/{CONFIG_FILE}; "
                             "log it with cssl_ray.experiments.train, tune or ablate)")
        try:
            cfg = load_config(config)
        except ConfigError as e:
            raise ValueError(f"{model_uri}: not a cssl_ray model of this version ({e})") from None
        model = mlflow.pytorch.load_model(str(local), map_location="cpu")
    return cfg, dict(model.state_dict())
