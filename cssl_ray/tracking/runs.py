"""The read side of the MLflow store: finding runs and reading them back as plain dicts.

Run layout and tags (other modules set the ``cssl.*`` tags; ``report.py`` relies on them):

    parent run   cssl.kind = tune | ablate, cssl.session = <id of one launch, reused on resume>
    child run    mlflow.parentRunId, cssl.trial_key (unique under its parent), cssl.kind = trial |
                 ablation, cssl.cell, cssl.seed, cssl.dataset, cssl.labelled_fraction, ...
"""
from __future__ import annotations

from typing import Any

from mlflow.entities import ViewType
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from cssl_ray.tracking.uri import client, store_missing

PARENT_TAG = "mlflow.parentRunId"
SESSION_TAG = "cssl.session"
KEY_TAG = "cssl.trial_key"
KIND_TAG = "cssl.kind"


def quote(value: str) -> str:
    """``value`` as a quoted string of an MLflow search filter."""
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


def search_runs(client: MlflowClient, experiment_id: str, filter_string: str = "") -> list:
    """Every active run matching ``filter_string``, newest first (follows page tokens)."""
    runs: list = []
    token = None
    while True:
        page = client.search_runs(
            [experiment_id], filter_string=filter_string, run_view_type=ViewType.ACTIVE_ONLY,
            max_results=1000, order_by=["attributes.start_time DESC"], page_token=token,
        )
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _experiment(uri: str, name: str):
    if store_missing(uri):
        return None
    exp = client(uri).get_experiment_by_name(name)
    return None if exp is None or exp.lifecycle_stage == "deleted" else exp


def require_experiment(uri: str, name: str) -> str:
    """The id of experiment ``name``; ``ValueError`` listing the experiments there if missing."""
    exp = _experiment(uri, name)
    if exp is not None:
        return exp.experiment_id
    names = [] if store_missing(uri) else sorted(e.name for e in client(uri).search_experiments())
    raise ValueError(
        f"experiment '{name}' not found in {uri}; experiments: {', '.join(names) or '(none)'}"
    )


def _as_dict(run) -> dict[str, Any]:
    return {
        "run_id": run.info.run_id,
        "name": run.info.run_name,
        "status": run.info.status,
        "tags": dict(run.data.tags),
        "params": dict(run.data.params),
        "metrics": dict(run.data.metrics),
        "start_time": run.info.start_time,
        "end_time": run.info.end_time,
    }


def find_runs(
    uri: str, experiment: str, *, parent_id: str | None = None, tags: dict[str, str] | None = None,
) -> list[dict[str, Any]]:
    """Active runs of ``experiment`` (newest first), optionally children of ``parent_id`` and
    carrying all of ``tags``. Each run: run_id, name, status, tags, params, metrics (latest value
    per key), start_time, end_time. [] when the experiment does not exist."""
    exp = _experiment(uri, experiment)
    if exp is None:
        return []
    wanted = dict(tags or {})
    if parent_id is not None:
        wanted[PARENT_TAG] = parent_id
    where = " AND ".join(f"tags.`{k}` = {quote(v)}" for k, v in wanted.items())
    return [_as_dict(r) for r in search_runs(client(uri), exp.experiment_id, where)]


def get_run(uri: str, run_id: str) -> dict[str, Any]:
    """One run as a plain dict; ``ValueError`` when ``run_id`` is not in ``uri``."""
    if store_missing(uri):
        raise ValueError(f"run '{run_id}' not found in {uri} (no database there)")
    try:
        return _as_dict(client(uri).get_run(run_id))
    except MlflowException as e:
        raise ValueError(f"run '{run_id}' not found in {uri}") from e


def latest_parent(uri: str, experiment: str, kind: str | None = None) -> dict[str, Any] | None:
    """The newest run without a parent, optionally with tag ``cssl.kind == kind``."""
    runs = find_runs(uri, experiment, tags={KIND_TAG: kind} if kind else None)
    parents = [r for r in runs if PARENT_TAG not in r["tags"]]
    return max(parents, key=lambda r: r["start_time"] or 0) if parents else None


def metric_history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    """``[(step, value), ...]`` sorted by step; a step logged twice (a resumed trial) keeps its
    last value."""
    history = client(uri).get_metric_history(run_id, key)
    last: dict[int, tuple[int, float]] = {}
    for m in history:
        if m.step not in last or m.timestamp >= last[m.step][0]:
            last[m.step] = (m.timestamp, m.value)
    return [(step, last[step][1]) for step in sorted(last)]
