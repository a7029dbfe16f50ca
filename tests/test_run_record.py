"""What a run leaves in MLflow (``cssl_ray.tracking.run_record``, ``cssl_ray.tracking.mlflow_model``) and the train
CLI's tracking: params, per-validation metrics, test metrics, dataset inputs, files, the model,
its registration and ``predict --model models:/...``."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from cssl_ray.config import from_dict
from cssl_ray.experiments import train
from cssl_ray.tracking.mlflow_model import MODEL_URI_TAG, register_model
from cssl_ray.tracking.run_record import cells_view, data_inputs, runs_view
from cssl_ray.tracking.runs import find_runs, metric_history
from cssl_ray.tracking.uri import client


@pytest.fixture(scope="module")
def tracked(tmp_path_factory) -> dict:
    """One smoke run of ``python -m cssl_ray.train --local`` recorded in a fresh store."""
    root = tmp_path_factory.mktemp("tracked")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    out = root / "run"
    assert train.main(["--local", "--smoke", "--quiet", "--out", str(out), "--tracking-uri", uri]) == 0
    (run,) = find_runs(uri, "synthetic")
    return {"root": root, "uri": uri, "out": out, "run": run}


def test_train_run_is_recorded_like_a_trial(tracked):
    run, uri, out = tracked["run"], tracked["uri"], tracked["out"]
    assert run["status"] == "FINISHED" and run["tags"]["cssl.kind"] == "train"
    assert run["tags"]["cssl.cell"] == "cssl" and run["tags"]["cssl.seed"] == "0"
    assert run["params"]["contrastive.tau"] == "0.1" and run["params"]["train.out_dir"] == str(out)
    history = metric_history(uri, run["run_id"], "val_dice_mean")
    validations = 2 + 2  # smoke: 2 stage-A epochs, 2 rounds
    assert [step for step, _ in history] == list(range(1, validations + 1))
    result = json.loads((out / "result.json").read_text())
    assert run["metrics"]["test_dice_mean"] == pytest.approx(result["test"]["dice_mean"])
    assert run["metrics"]["best_round"] == result["best_round"]
    artifacts = {a.path for a in client(uri).list_artifacts(run["run_id"])}
    assert {"config.yaml", "split.json", "result.json", "figures"} <= artifacts
    inputs = client(uri).get_run(run["run_id"]).inputs.dataset_inputs
    contexts = {d.dataset.name: d.tags[0].value for d in inputs}
    assert contexts == {"synthetic/D_L": "train", "synthetic/D_U": "unlabelled", "synthetic/val": "validation",
                        "synthetic/test": "test"}
    assert client(uri).get_experiment_by_name("synthetic").tags["mlflow.experimentKind"] == "custom_model_development"


def test_registered_model_predicts_like_best_pt(tracked, tmp_path, capsys):
    from cssl_ray.experiments import predict

    run, uri = tracked["run"], tracked["uri"]
    model_uri = run["tags"][MODEL_URI_TAG]
    info = client(uri).get_logged_model(model_uri.split("/")[-1])
    assert info.source_run_id == run["run_id"]
    version = register_model(uri, model_uri, "smoke-model", run["run_id"])
    assert version == 1 and register_model(uri, model_uri, "smoke-model", run["run_id"]) == 2
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        Image.fromarray(rng.integers(0, 256, (40, 36), dtype=np.uint8)).save(images / f"{name}.png")
    outs = {}
    for source in (str(tracked["out"] / "best.pt"), "models:/smoke-model/1"):
        outs[source] = tmp_path / source.replace("/", "_").replace(":", "_")
        assert predict.main(["--model", source, "--images", str(images), "--out", str(outs[source]), "--local",
                             "--tracking-uri", uri]) == 0
    for name in ("a", "b"):
        masks = [np.array(Image.open(o / f"{name}_mask.png")) for o in outs.values()]
        np.testing.assert_array_equal(masks[0], masks[1])
    capsys.readouterr()
    assert predict.main(["--model", "models:/no-such-model/1", "--images", str(images), "--out",
                         str(tmp_path / "x"), "--local", "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "models:/no-such-model/1" in err


def test_resume_reopens_the_run_and_no_track_records_nothing(tracked, tmp_path):
    uri, out = tracked["uri"], tracked["out"]
    assert train.main(["--local", "--smoke", "--quiet", "--out", str(out), "--tracking-uri", uri, "--resume"]) == 0
    (run,) = find_runs(uri, "synthetic")
    assert run["run_id"] == tracked["run"]["run_id"] and run["status"] == "FINISHED"
    other = f"sqlite:///{tmp_path / 'none.db'}"
    assert train.main(["--local", "--smoke", "--quiet", "--out", str(tmp_path / "r"), "--tracking-uri", other,
                       "--no-track"]) == 0
    assert not (tmp_path / "none.db").exists()


def test_a_failed_run_ends_failed(tmp_path, monkeypatch):
    import cssl_ray.run.local

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(cssl_ray.run.local, "run_local", broken)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(RuntimeError):
        train.main(["--local", "--smoke", "--quiet", "--out", str(tmp_path / "r"), "--tracking-uri", uri])
    (run,) = find_runs(uri, "synthetic")
    assert run["status"] == "FAILED"


def test_data_inputs_digest_the_rows(tmp_path):
    cfg = from_dict({"data": {"name": "nuclei", "num_classes": 3}})
    (tmp_path / "split.json").write_text(json.dumps({"labelled": [0], "unlabelled": [1, 2], "val": [3], "test": [4]}))
    by_index = {d["context"]: d for d in data_inputs(cfg, tmp_path)}
    assert by_index["unlabelled"]["profile"] == {"num_rows": 2, "split_part": "unlabelled", "rows": [1, 2]}
    (tmp_path / "split_names.json").write_text(json.dumps(
        {"labelled": ["a"], "unlabelled": ["b", "c"], "val": ["d"], "test": ["e"]}))
    by_name = {d["context"]: d for d in data_inputs(cfg, tmp_path)}
    assert by_name["train"]["name"] == "nuclei/D_L" and by_name["train"]["profile"]["rows"] == ["a"]
    assert by_name["train"]["digest"] != by_index["train"]["digest"]  # real data: the names, not positions
    assert len({d["digest"] for d in by_name.values()}) == 4
    other = from_dict({"data": {"name": "nuclei", "num_classes": 3, "image_size": [64, 64]}})
    assert {d["digest"] for d in data_inputs(other, tmp_path)}.isdisjoint(d["digest"] for d in by_name.values())
    assert data_inputs(cfg, tmp_path / "missing") == []


def test_views_show_cells_seeds_and_test_metrics():
    view = runs_view("val_dice/micronucleus", "p1")
    assert view["searchFilter"] == "tags.`mlflow.parentRunId` = 'p1'"  # one search's or ablation's runs
    cols = view["selectedColumns"]
    assert cols[:4] == ["tags.`cssl.cell`", "tags.`cssl.seed`", "tags.`cssl.method`", "metrics.`val_dice/micronucleus`"]
    assert "metrics.`test_hd95_mean`" in cols and cols[-2:] == ["attributes.`Dataset`", "attributes.`Models`"]
    assert view["groupBy"]["groupByKeys"] == [{"mode": "tag", "groupByData": "cssl.cell"}]
    charts = cells_view("val_dice_mean", "p1")["compareRunCharts"]
    assert [(c["type"], c["metricKey"]) for c in charts] == [
        ("BAR", "test_dice_mean"), ("BAR", "test_hd95_mean"), ("BAR", "test_dice_image_mean"), ("LINE", "val_dice_mean")]
