"""What one finished run leaves in MLflow: the same for a Tune trial and for ``cssl_ray.experiments.train``.

    metrics    test_<key> (the test metrics of the selected weights), test_last_<key> (the last
               round's weights: Dice, IoU), best_round, last_round, stage_a_<key>, the rounds' instruments
               (round1_pseudo_coverage/<class>, round1_confidence/<class>, patches_per_step_mean, ...:
               ``records.rounds_summary``)
    inputs     D_L, D_U, val and test as MLflow datasets (contexts train, unlabelled, validation,
               test), each with a digest of its rows and the data config it was cut from
    files      config.yaml, split.json, split_names.json, result.json, figures/
    model      the selected weights as an MLflow PyTorch model (``mlflow_model.log_model``), its URI
               in the run's tag ``cssl.model_uri``
    tags       cssl.warning (the run's warnings), cssl.out_dir

The run folder is the one ``records.write_run_files`` and ``records.evaluate_best`` write; nothing
here reads pixels.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

from cssl_ray.config import Config, to_dict

RUN_FILES = ("config.yaml", "split.json", "split_names.json", "result.json")
# split part -> (dataset name suffix, MLflow's input context)
PARTS = {"labelled": ("D_L", "train"), "unlabelled": ("D_U", "unlabelled"), "val": ("val", "validation"),
         "test": ("test", "test")}
MAX_LISTED_ROWS = 200  # a part's row names in its dataset profile up to this many (split.json has all)


def read_result(out_dir: Path) -> dict[str, Any]:
    """A finished run's result.json ({} if the run did not finish)."""
    path = Path(out_dir) / "result.json"
    return json.loads(path.read_text()) if path.exists() else {}


def selected_value(best_val: dict[str, float], metric_analysis: dict[str, dict[str, float]], metric: str,
                   mode: str) -> float:
    """``metric`` of the weights a trial kept (its result.json ``best_val``: ``val_dice_mean`` is
    ``best_val["dice_mean"]``), else Tune's best over the trial's reports; nan when neither has it.

    The two differ under the paper's protocol: stage A reports every epoch, and its best epoch can
    beat every round while its weights are not kept (stage A ends at its last step). Ranking trials by
    Tune's maximum would then rank them by stage A's peak, the same for every trial that shares it.
    """
    key = metric.removeprefix("val_")
    if metric.startswith("val_") and key in best_val:
        return float(best_val[key])
    return float(metric_analysis.get(metric, {}).get(mode, math.nan))


def data_inputs(cfg: Config, out_dir: Path) -> list[dict[str, Any]]:
    """The run's four data parts as dataset inputs (``Tracker.log_datasets``); [] before split.json exists.

    The digest hashes the data config the split was cut from and the part's rows (image names for
    real datasets, indices for synthetic ones): two runs on the same images share a digest."""
    out_dir = Path(out_dir)
    if not (out_dir / "split.json").is_file():
        return []
    split = json.loads((out_dir / "split.json").read_text())
    names_file = out_dir / "split_names.json"
    names = json.loads(names_file.read_text()) if names_file.is_file() else None
    data = to_dict(cfg)["data"]
    source = json.dumps({"uri": f"cssl_ray:{cfg.data.name}", "data": data}, sort_keys=True)
    c, (h, w) = cfg.data.in_channels, cfg.data.image_size
    inputs = []
    for part, (suffix, context) in PARTS.items():
        rows = (names or split)[part]
        digest = hashlib.sha256(json.dumps([source, rows]).encode()).hexdigest()[:12]
        profile: dict[str, Any] = {"num_rows": len(rows), "split_part": part}
        if len(rows) <= MAX_LISTED_ROWS:
            profile["rows"] = rows
        schema = {"image": f"float32 ({c}, {h}, {w})",
                  "mask": "never read (unlabelled)" if part == "unlabelled" else f"int64 ({h}, {w})"}
        inputs.append({"name": f"{cfg.data.name}/{suffix}", "digest": digest, "source": source,
                       "context": context, "profile": profile, "schema": schema})
    return inputs


def record_result(tracker: Any, run_id: str, cfg: Config, out_dir: Path, step: int, *,
                  log_model: bool = True, warnings: list[str] | None = None) -> dict[str, Any]:
    """Log a run's outcome (module docstring) from its folder; returns its result.json ({} if none).
    ``warnings``: the run's warnings when known otherwise (a trial's, ``progress.run_warnings``);
    default result.json's."""
    out_dir = Path(out_dir)
    result = read_result(out_dir)
    if result:
        tracker.log_metrics(run_id, {f"test_{k}": v for k, v in result["test"].items()}, step=step)
        tracker.log_metrics(run_id, {f"test_last_{k}": v for k, v in result.get("test_last", {}).items()}, step=step)
        stage_a = {f"stage_a_{k}": v for k, v in result.get("stage_a", {}).items()}
        tracker.log_metrics(run_id, {"best_round": float(result.get("best_round", 0)),
                                     "last_round": float(result.get("last_round", 0)), **stage_a,
                                     **result.get("rounds", {})}, step=step)
    raised = result.get("warnings", []) if warnings is None else warnings
    if raised:
        tracker.set_tags(run_id, {"cssl.warning": " | ".join(raised)[:5000]})
    tracker.log_datasets(run_id, data_inputs(cfg, out_dir))
    tracker.set_tags(run_id, {"cssl.out_dir": str(out_dir)})
    for name in RUN_FILES:
        tracker.log_artifact(run_id, out_dir / name)
    tracker.log_artifacts(run_id, out_dir / "figures", "figures")
    if result and log_model and (out_dir / "best.pt").is_file():
        from cssl_ray.tracking.mlflow_model import MODEL_URI_TAG
        from cssl_ray.tracking.mlflow_model import log_model as log_pytorch_model
        tracker.set_tags(run_id, {MODEL_URI_TAG: log_pytorch_model(tracker.uri, run_id, out_dir / "best.pt")})
    return result


TEST_COLUMNS = ("test_dice_mean", "test_dice_image_mean", "test_iou_mean", "test_hd95_mean", "test_asd_mean")


def _column(kind: str, key: str) -> str:
    return f"{kind}.`{key}`"  # a column id of MLflow's runs table


def runs_view(metric: str, parent_id: str) -> dict[str, Any]:
    """The runs table a trainer opens first (``Tracker.share_view``): the runs of one search or
    ablation (``parent_id``'s children) grouped by ``cssl.cell`` (groups open, a row per seed; a
    view cannot open a parent run's children, a group can), with the columns cell, seed, method, the
    space's validation metric, the test metrics, the tested round, then the dataset inputs and the
    logged model."""
    tags = [_column("tags", t) for t in ("cssl.cell", "cssl.seed", "cssl.method")]
    metrics = [_column("metrics", m) for m in dict.fromkeys([metric, *TEST_COLUMNS, "best_round"])]
    shown = [*tags, *metrics, _column("attributes", "Dataset"), _column("attributes", "Models")]
    return {
        "searchFilter": f"tags.`mlflow.parentRunId` = '{parent_id}'",
        "selectedColumns": shown,
        "columnOrder": shown,
        "groupBy": {"aggregateFunction": "average", "groupByKeys": [{"mode": "tag", "groupByData": "cssl.cell"}]},
        "hideEmptyCharts": True,
    }


def cells_view(metric: str, parent_id: str) -> dict[str, Any]:
    """The chart view that compares cells: the runs view's table and groups (mean over seeds), a
    bar chart per test metric and the space's validation metric per step. Open it with
    ``compareRunsMode=CHART``."""
    section = {"uuid": "cssl-section", "name": "cells", "display": True, "isReordered": False,
               "deleted": False, "isGenerated": False}

    def chart(i: int, kind: str, key: str) -> dict[str, Any]:
        card = {"uuid": f"cssl-chart-{i}", "type": kind, "runsCountToCompare": 100, "metricSectionId": "cssl-section",
                "deleted": False, "isGenerated": False, "metricKey": key}
        if kind == "LINE":
            card.update({"xAxisKey": "step", "scaleType": "linear", "lineSmoothness": 0, "useGlobalXaxisKey": False})
        return card

    bars = [chart(i, "BAR", m) for i, m in enumerate(("test_dice_mean", "test_hd95_mean", "test_dice_image_mean"))]
    return {
        **runs_view(metric, parent_id),
        "useGroupedValuesInCharts": True,
        "compareRunCharts": [*bars, chart(len(bars), "LINE", metric)],
        "compareRunSections": [section],
        "isAccordionReordered": True,
    }


class RecordLogger:
    """``log`` for a run's validation records: each record's numbers as MLflow metrics at its
    ``step``. Picklable (a Ray Train callback may run it in another process); the client is made
    on first use."""

    def __init__(self, uri: str, experiment: str, run_id: str) -> None:
        self.uri, self.experiment, self.run_id = uri, experiment, run_id
        self._tracker: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_tracker": None}

    def __call__(self, record: dict[str, Any]) -> None:
        if self._tracker is None:
            from cssl_ray.tracking.tracker import Tracker
            self._tracker = Tracker(self.uri, self.experiment)
        self._tracker.log_metrics(self.run_id, record, step=int(record.get("step", 0)))
