"""cssl_ray.tracking.tracker, runs and uri on a temporary sqlite store (and, marked slow, a real `mlflow server`)."""
from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from cssl_ray.tracking.runs import find_runs, get_run, latest_parent, metric_history, require_experiment
from cssl_ray.tracking.tracker import Tracker, flatten_config, git_commit, sanitize_key
from cssl_ray.tracking.uri import tracking_uri, ui_command


@pytest.fixture
def uri(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/mlflow.db"


def _tree(tracker: Tracker) -> tuple[str, str, str]:
    parent = tracker.start_parent("ablate-1", {"cssl.kind": "ablate"}, session="s1")
    params = flatten_config({"contrastive": {"tau": 0.1}, "data": {"image_size": (96, 96)}})
    a = tracker.start_child(parent, "cl-0", "cl seed 0", params, {"cssl.kind": "ablation", "cssl.cell": "cl"})
    b = tracker.start_child(parent, "cssl-0", "cssl seed 0", params, {"cssl.kind": "ablation", "cssl.cell": "cssl"})
    return parent, a, b


def test_experiment_artifacts_beside_db(uri: str, tmp_path: Path) -> None:
    tracker = Tracker(uri, "exp one")
    loc = tracker.client.get_experiment(tracker.experiment_id).artifact_location
    assert loc == (tmp_path / "mlartifacts" / "exp_one").as_uri()
    assert Tracker(uri, "exp one").experiment_id == tracker.experiment_id  # reused, not recreated

    parent = tracker.start_parent("p", {}, session="s")
    f = tmp_path / "note.txt"
    f.write_text("hi")
    assert tracker.log_artifact(parent, f, "notes") is True
    assert tracker.log_artifact(parent, tmp_path / "missing.txt") is False
    assert tracker.log_artifacts(parent, tmp_path / "no_dir") is False
    assert (tmp_path / "mlartifacts" / "exp_one" / parent / "artifacts" / "notes" / "note.txt").exists()


def test_parent_children_params_metrics(uri: str) -> None:
    tracker = Tracker(uri, "e")
    parent, a, b = _tree(tracker)
    for step in (0, 1, 2):
        tracker.log_metrics(a, {"loss": 1.0 / (step + 1), "val_dice/cls 1": 0.5 + step / 10,
                                "early": True, "name": "x", "none": None}, step=step)
    tracker.log_metrics(a, {"test_dice_mean": 0.8}, step=2)
    tracker.end(a, "FINISHED")

    assert metric_history(uri, a, "loss") == [(0, 1.0), (1, 0.5), (2, 1.0 / 3)]
    children = find_runs(uri, "e", parent_id=parent)
    assert {r["run_id"] for r in children} == {a, b}
    run = next(r for r in children if r["run_id"] == a)
    assert run["name"] == "cl seed 0" and run["status"] == "FINISHED"
    assert run["params"] == {"contrastive.tau": "0.1", "data.image_size": "[96, 96]"}
    assert run["tags"]["mlflow.parentRunId"] == parent and run["tags"]["cssl.trial_key"] == "cl-0"
    assert run["metrics"] == {"loss": pytest.approx(1 / 3), "val_dice/cls 1": pytest.approx(0.7),
                              "test_dice_mean": 0.8}  # latest value; bools, strings, None skipped
    assert [r["run_id"] for r in find_runs(uri, "e", tags={"cssl.cell": "cssl"})] == [b]
    assert latest_parent(uri, "e")["run_id"] == parent
    assert latest_parent(uri, "e", kind="ablate")["run_id"] == parent
    assert latest_parent(uri, "e", kind="tune") is None
    assert find_runs(uri, "nope") == []


def test_resume_reopens_without_duplicates(uri: str) -> None:
    tracker = Tracker(uri, "e")
    parent, a, b = _tree(tracker)
    tracker.log_metrics(a, {"loss": 2.0}, step=0)
    assert tracker.close_open_runs() == 3  # the crash: parent and both children were RUNNING

    again = Tracker(uri, "e")
    assert again.start_parent("ablate-1 (resumed)", {"cssl.kind": "ablate"}, session="s1") == parent
    changed = {"contrastive.tau": "0.5"}  # a changed param must not be re-logged (MLflow refuses)
    assert again.start_child(parent, "cl-0", "cl seed 0", changed, {"cssl.cell": "cl"}) == a
    assert get_run(uri, a)["status"] == "RUNNING"
    assert get_run(uri, a)["params"]["contrastive.tau"] == "0.1"
    again.log_metrics(a, {"loss": 1.0}, step=0)  # re-logged step: the last value wins
    assert metric_history(uri, a, "loss") == [(0, 1.0)]
    assert len(find_runs(uri, "e")) == 3
    other = again.start_parent("another", {}, session="s2")
    assert other != parent

    assert again.close_open_runs("FAILED", parent_id=parent) == 2  # parent + child a; not `other`
    assert get_run(uri, other)["status"] == "RUNNING"
    assert again.close_open_runs() == 1
    assert {r["status"] for r in find_runs(uri, "e")} == {"KILLED", "FAILED"}
    with pytest.raises(ValueError, match="RUNNING"):
        again.end(a, "RUNNING")


def test_metric_names_sanitised_and_nan(uri: str) -> None:
    tracker = Tracker(uri, "e")
    run = tracker.start_parent("p", {}, session="s")
    tracker.log_metrics(run, {"val_dice/a@b": 1.0, "x:y": 2.0, "/lead//twice/": 3.0, "../up": 4.0,
                              "nan": float("nan"), "inf": float("inf"), "ninf": -float("inf")}, step=0)
    metrics = get_run(uri, run)["metrics"]
    assert {k for k in metrics} == {"val_dice/a_b", "x_y", "lead/twice", "_/up", "nan", "inf", "ninf"}
    assert math.isnan(metrics["nan"]) and math.isnan(metric_history(uri, run, "nan")[0][1])
    assert metrics["inf"] == sys.float_info.max and metrics["ninf"] == -sys.float_info.max
    assert sanitize_key("ok-name_1.2/x y") == "ok-name_1.2/x y"
    assert sanitize_key("a" * 300) == "a" * 250


def test_tracking_uri_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri() == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///sub/m.db")
    assert tracking_uri() == f"sqlite:///{tmp_path.resolve()}/sub/m.db"
    assert tracking_uri("http://host:5000") == "http://host:5000"
    assert tracking_uri("sqlite:////abs/x.db") == "sqlite:////abs/x.db"
    assert tracking_uri("file:mlruns") == (tmp_path.resolve() / "mlruns").as_uri()
    assert ui_command("sqlite:////abs/x.db") == "mlflow ui --backend-store-uri sqlite:////abs/x.db"
    assert ui_command("https://mlflow.example") == "open https://mlflow.example"


def test_flatten_and_git_commit() -> None:
    flat = flatten_config({"a": {"b": {"c": 1}, "d": [1, (2, 3)], "e": {}}, "f": True, "g": "s"})
    assert flat == {"a.b.c": "1", "a.d": "[1, [2, 3]]", "a.e": "{}", "f": "True", "g": "s"}
    head = git_commit()
    assert head == "unknown" or len(head) == 40


def test_require_experiment_lists_names(uri: str, tmp_path: Path) -> None:
    Tracker(uri, "alpha")
    Tracker(uri, "beta")
    assert require_experiment(uri, "alpha")
    with pytest.raises(ValueError, match=r"experiment 'x' not found in .*; experiments: .*alpha, beta"):
        require_experiment(uri, "x")
    missing = f"sqlite:///{tmp_path}/none.db"
    with pytest.raises(ValueError, match="not found"):
        require_experiment(missing, "x")
    assert not (tmp_path / "none.db").exists()  # reading never creates a store


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(base: str, path: str, body: dict) -> dict:
    req = urllib.request.Request(base + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


@pytest.mark.slow
def test_mlflow_server_rest(tmp_path: Path) -> None:
    port = _free_port()
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    server = subprocess.Popen(
        [str(mlflow_bin), "server", "--backend-store-uri", f"sqlite:///{tmp_path}/mlflow.db",
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],  # 1: the default 4 double start-up on 2 cores
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(base + "/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None, "mlflow server exited"
            assert time.monotonic() < deadline, "mlflow server did not answer in 60 s"
            time.sleep(0.5)

        tracker = Tracker(base, "rest")
        parent = tracker.start_parent("tune-1", {"cssl.kind": "tune"}, session="s")
        child = tracker.start_child(parent, "t0", "trial 0", {"optim.lr": "0.001"}, {"cssl.kind": "trial"})
        tracker.log_metrics(child, {"val_dice_mean": 0.4, "omega": float("nan")}, step=0)
        tracker.log_metrics(child, {"val_dice_mean": 0.6}, step=1)
        note = tmp_path / "note.txt"
        note.write_text("x")
        assert tracker.log_artifact(child, note)
        tracker.log_datasets(child, [{"name": "nuclei/D_L", "digest": "abc123", "source": '{"uri": "x"}',
                                      "context": "train", "profile": {"num_rows": 3}}])
        view = tracker.share_view("v", "cssl: runs", {"selectedColumns": ["tags.`cssl.cell`"]})
        tracker.end(child, "FINISHED")
        assert tracker.close_open_runs() == 1  # the parent

        # the UI opens the experiment on its runs table (model training), with the shared view
        with urllib.request.urlopen(f"{base}/api/2.0/mlflow/experiments/get-by-name?experiment_name=rest",
                                    timeout=10) as resp:
            exp = json.loads(resp.read())
        exp_tags = {t["key"]: t["value"] for t in exp["experiment"]["tags"]}
        assert exp_tags["mlflow.experimentKind"] == "custom_model_development"
        saved = json.loads(exp_tags["mlflow.sharedViewState.v"])  # MLflow 3's saved-view envelope
        assert saved["name"] == "cssl: runs" and isinstance(saved["createdAt"], int)
        assert json.loads(saved["state"]) == {"selectedColumns": ["tags.`cssl.cell`"]}
        assert view == f"#/experiments/{tracker.experiment_id}/runs?workflowType=machine_learning&viewStateShareKey=v"

        runs = _post(base, "/api/2.0/mlflow/runs/search", {"experiment_ids": [tracker.experiment_id]})["runs"]
        by_id = {r["info"]["run_id"]: r for r in runs}
        assert set(by_id) == {parent, child}
        assert by_id[parent]["info"]["status"] == "KILLED"
        c = by_id[child]
        assert c["info"]["status"] == "FINISHED"
        tags = {t["key"]: t["value"] for t in c["data"]["tags"]}
        assert tags["mlflow.parentRunId"] == parent and tags["cssl.trial_key"] == "t0"
        assert {p["key"]: p["value"] for p in c["data"]["params"]} == {"optim.lr": "0.001"}
        metrics = {m["key"]: m for m in c["data"]["metrics"]}
        assert metrics["val_dice_mean"]["value"] == 0.6 and metrics["val_dice_mean"]["step"] == 1
        assert metric_history(base, child, "val_dice_mean") == [(0, 0.4), (1, 0.6)]
        assert math.isnan(metric_history(base, child, "omega")[0][1])
        (data,) = c["inputs"]["dataset_inputs"]  # the runs table's Dataset column
        assert data["dataset"]["name"] == "nuclei/D_L" and data["dataset"]["digest"] == "abc123"
        assert data["tags"] == [{"key": "mlflow.data.context", "value": "train"}]
    finally:
        try:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=15)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(server.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            server.wait(timeout=5)
