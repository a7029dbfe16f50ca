"""The MLflow side of experiments, writing: one driver-side writer (``Tracker``) and what it logs
(``flatten_config``, ``git_commit``, ``sanitize_key``); ``cssl_ray.tracking.runs`` reads runs back.

Everything goes through ``MlflowClient`` with explicit run ids, never the fluent global active run:
a Tune driver holds a parent run and many child runs open at once.

What MLflow 3.17 accepts (checked against its sqlite store and ``mlflow server``):

    NaN          logged and read back as NaN
    +-inf        the sqlite store silently stores +-1.797e308; we clip to that explicitly so every
                 store (sqlite, REST) keeps the same value
    names        alphanumerics, ``_ - . space / :``; no leading ``/``, ``//``, ``.`` or ``..`` parts;
                 <= 250 characters. ``sanitize_key`` maps everything else (and ``:``, which Windows
                 rejects) to ``_``
    status       any of RUNNING, FINISHED, FAILED, KILLED can follow any other (a resumed run goes
                 back to RUNNING; its end_time is kept until it ends again)
    params       immutable once logged (a changed value raises), <= 100 per log_batch
"""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
import re
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from cssl_ray.tracking.runs import KEY_TAG, PARENT_TAG, SESSION_TAG, quote, search_runs
from cssl_ray.tracking.uri import client, local_store_path

ENDED = ("FINISHED", "FAILED", "KILLED")
# Recorded for UIs that read it. MLflow 3.17's UI ignores it: it opens the side the URL's workflowType names,
# else the browser's last choice, else GenAI's overview (docs/check_mlflow_landing.py), so the links we
# print carry workflowType=machine_learning
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
VIEW_TAG = "mlflow.sharedViewState."  # + a key: a runs-table view the UI opens with ?viewStateShareKey=<key>

_MAX_KEY = 250  # MLflow's MAX_ENTITY_KEY_LENGTH
_MAX_PARAMS_PER_BATCH = 100  # MAX_PARAMS_TAGS_PER_BATCH
_MAX_METRICS_PER_BATCH = 1000
_BAD_CHARS = re.compile(r"[^A-Za-z0-9_\-. /]")
_FLOAT_MAX = sys.float_info.max


def flatten_config(d: Mapping[str, Any] | Any, prefix: str = "") -> dict[str, str]:
    """A nested resolved config as MLflow params: ``{"contrastive.tau": "0.1", ...}``.

    Sequences are written as JSON (``"[96, 96]"``), everything else with ``str``. Dataclass
    instances are accepted and read with ``dataclasses.asdict``.
    """
    if dataclasses.is_dataclass(d) and not isinstance(d, type):
        d = dataclasses.asdict(d)
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            v = dataclasses.asdict(v)
        if isinstance(v, Mapping) and v:
            out.update(flatten_config(v, prefix=f"{key}."))
        elif isinstance(v, Mapping):
            out[key] = "{}"
        elif isinstance(v, (list, tuple)):
            out[key] = json.dumps(_plain(v), default=str)
        else:
            out[key] = str(v)
    return out


def _plain(v: Any) -> Any:
    return [_plain(x) for x in v] if isinstance(v, (list, tuple)) else v


def git_commit() -> str:
    """HEAD of the git checkout holding this package, or ``"unknown"``."""
    try:
        res = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
            capture_output=True, text=True, timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    head = res.stdout.strip()
    return head if res.returncode == 0 and head else "unknown"


def sanitize_key(key: str) -> str:
    """A metric / param / tag name MLflow accepts on every OS (see the module docstring)."""
    key = _BAD_CHARS.sub("_", str(key))
    parts = [p for p in key.split("/") if p != ""]  # no leading, trailing or doubled slashes
    parts = ["_" if p in (".", "..") else p for p in parts]
    key = "/".join(parts) or "_"
    return key[:_MAX_KEY]


def _finite(value: float) -> float:
    """NaN passes; +-inf is clipped to +-float max (what the sqlite store would store anyway)."""
    if math.isinf(value):
        return _FLOAT_MAX if value > 0 else -_FLOAT_MAX
    return value


def _is_number(value: Any) -> bool:
    # numpy floats / ints are numbers.Real; bool (and numpy.bool_, which is not Real) are not.
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _now_ms() -> int:
    return int(time.time() * 1000)


def _chunks(items: list, n: int) -> Iterable[list]:
    for i in range(0, len(items), n):
        yield items[i:i + n]


class Tracker:
    """Writes parent and child runs of one experiment; every call names its run id.

    For local stores (sqlite, file) a new experiment's artifact location is the absolute folder
    ``<db dir>/mlartifacts/<experiment>``, so ``mlflow ui`` started from any folder finds the
    artifacts. Remote servers choose their own artifact location.
    """

    def __init__(self, uri: str, experiment: str) -> None:
        if not experiment:
            raise ValueError("experiment name must be a non-empty string")
        self.uri = uri
        self.experiment = experiment
        self.client = client(uri)
        self.experiment_id = self._ensure_experiment()

    def _ensure_experiment(self) -> str:
        exp = self.client.get_experiment_by_name(self.experiment)
        if exp is None:
            store = local_store_path(self.uri)
            location = None
            if store is not None:
                folder = re.sub(r"[^A-Za-z0-9_.\-]", "_", self.experiment)
                location = (store.resolve().parent / "mlartifacts" / folder).as_uri()
            try:
                return self.client.create_experiment(self.experiment, artifact_location=location,
                                                     tags=dict([EXPERIMENT_KIND]))
            except MlflowException:  # created meanwhile by another process
                exp = self.client.get_experiment_by_name(self.experiment)
                if exp is None:
                    raise
        if exp.lifecycle_stage == "deleted":
            raise ValueError(
                f"experiment '{self.experiment}' is deleted in {self.uri}; restore it "
                f"(mlflow experiments restore --experiment-id {exp.experiment_id}) or use another name"
            )
        if exp.tags.get(EXPERIMENT_KIND[0]) != EXPERIMENT_KIND[1]:
            self.client.set_experiment_tag(exp.experiment_id, *EXPERIMENT_KIND)
        return exp.experiment_id

    # -- runs -------------------------------------------------------------------------------

    def start_parent(self, name: str, tags: dict[str, str], session: str) -> str:
        """A parent run tagged ``cssl.session=session``; an existing one with that session is reopened."""
        found = [
            r for r in search_runs(self.client, self.experiment_id, f"tags.`{SESSION_TAG}` = {quote(session)}")
            if PARENT_TAG not in r.data.tags
        ]
        if found:
            return self.reopen(found[0].info.run_id, tags)
        run = self.client.create_run(self.experiment_id, run_name=name)
        self.set_tags(run.info.run_id, {**tags, SESSION_TAG: session})
        return run.info.run_id

    def start_child(
        self, parent_id: str, key: str, name: str, params: dict[str, str], tags: dict[str, str],
    ) -> str:
        """A child run of ``parent_id`` tagged ``cssl.trial_key=key``.

        A child with that key already under the parent is reopened (status RUNNING) and its
        params are left alone: MLflow refuses to change a logged param.
        """
        found = search_runs(
            self.client, self.experiment_id,
            f"tags.`{PARENT_TAG}` = {quote(parent_id)} AND tags.`{KEY_TAG}` = {quote(key)}",
        )
        if found:
            return self.reopen(found[0].info.run_id, tags)
        return self.start_run(name, params, {**tags, PARENT_TAG: parent_id, KEY_TAG: key})

    def start_run(self, name: str, params: dict[str, str], tags: dict[str, str]) -> str:
        """A new run with ``params`` and ``tags``."""
        run = self.client.create_run(self.experiment_id, run_name=name)
        run_id = run.info.run_id
        self.set_tags(run_id, tags)
        plist = [Param(sanitize_key(k), str(v)) for k, v in params.items()]
        for chunk in _chunks(plist, _MAX_PARAMS_PER_BATCH):
            self.client.log_batch(run_id, params=chunk)
        return run_id

    def reopen(self, run_id: str, tags: dict[str, str]) -> str:
        """An interrupted run resumed: RUNNING again, with the current tags (its params are left alone)."""
        self.client.update_run(run_id, status="RUNNING")
        self.set_tags(run_id, tags)
        return run_id

    def log_metrics(
        self, run_id: str, metrics: dict[str, Any], step: int, timestamp_ms: int | None = None,
    ) -> None:
        """Log the numeric entries of ``metrics`` at ``step``; bools, strings and None are skipped."""
        ts = _now_ms() if timestamp_ms is None else int(timestamp_ms)
        batch = {
            sanitize_key(k): Metric(sanitize_key(k), _finite(float(v)), ts, int(step))
            for k, v in metrics.items() if _is_number(v)
        }
        for chunk in _chunks(list(batch.values()), _MAX_METRICS_PER_BATCH):
            self.client.log_batch(run_id, metrics=chunk)

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        tlist = [RunTag(sanitize_key(k), str(v)) for k, v in tags.items()]
        for chunk in _chunks(tlist, _MAX_PARAMS_PER_BATCH):
            self.client.log_batch(run_id, tags=chunk)

    def log_artifact(self, run_id: str, path: str | Path, artifact_path: str | None = None) -> bool:
        """Upload one file; False (nothing logged) when ``path`` is not a file."""
        if not Path(path).is_file():
            return False
        self.client.log_artifact(run_id, str(path), artifact_path)
        return True

    def log_artifacts(self, run_id: str, folder: str | Path, artifact_path: str | None = None) -> bool:
        """Upload a folder's contents; False (nothing logged) when ``folder`` is not a folder."""
        if not Path(folder).is_dir():
            return False
        self.client.log_artifacts(run_id, str(folder), artifact_path)
        return True

    def log_datasets(self, run_id: str, inputs: Iterable[Mapping[str, Any]]) -> None:
        """Dataset inputs of a run (the runs table's Dataset column). Each input: name, digest (<= 36
        characters), source (a JSON string), context (train, validation, test, ...), profile (a dict,
        stored as JSON) and schema (a dict, stored as JSON)."""
        entries = [
            DatasetInput(
                Dataset(name=d["name"], digest=d["digest"][:36], source_type="local", source=d["source"],
                        schema=json.dumps(d.get("schema", {})), profile=json.dumps(d.get("profile", {}))),
                tags=[InputTag("mlflow.data.context", d["context"])])
            for d in inputs
        ]
        if entries:
            self.client.log_inputs(run_id, datasets=entries)

    def share_view(self, key: str, name: str, state: Mapping[str, Any]) -> str:
        """Store a saved runs-table view of the experiment (columns shown, grouping, charts) under
        ``key``, listed as ``name`` in the UI's Views menu; returns the UI path that opens it,
        relative to the server's root. The tag holds MLflow 3's saved-view envelope (name, times,
        the state as a JSON string); the key is kept, so a rerun updates the view in place."""
        now = _now_ms()
        envelope = {"name": name, "createdAt": now, "updatedAt": now, "state": json.dumps(dict(state))}
        self.client.set_experiment_tag(self.experiment_id, VIEW_TAG + key, json.dumps(envelope))
        # workflowType: the UI's model-training side (its default, GenAI, opens on traces)
        return f"#/experiments/{self.experiment_id}/runs?workflowType=machine_learning&viewStateShareKey={key}"

    def end(self, run_id: str, status: str) -> None:
        if status not in ENDED:
            raise ValueError(f"run status '{status}' is not one of {', '.join(ENDED)}")
        self.client.set_terminated(run_id, status)

    def close_open_runs(self, status: str = "KILLED", parent_id: str | None = None) -> int:
        """Set every RUNNING run of the experiment (or ``parent_id`` and its children) to ``status``."""
        if status not in ENDED:
            raise ValueError(f"run status '{status}' is not one of {', '.join(ENDED)}")
        running = search_runs(self.client, self.experiment_id, "attributes.status = 'RUNNING'")
        if parent_id is not None:
            running = [
                r for r in running
                if r.info.run_id == parent_id or r.data.tags.get(PARENT_TAG) == parent_id
            ]
        for r in running:
            self.client.set_terminated(r.info.run_id, status)
        return len(running)
