"""cssl_ray.tune end to end on CPU, against a temporary MLflow store (ablate: tests/test_demo.py).

Slow (Ray): each command starts its own local Ray instance (private RAY_TMPDIR, see conftest_ray).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest_ray import descendant_processes, local_ray, own_lines, ray_test_env

from cssl_ray import tune
from cssl_ray.config import load_config
from cssl_ray.tracking import find_runs, latest_parent, metric_history

ROOT = Path(__file__).resolve().parent.parent
SMOKE_SPACE = ROOT / "tune_spaces" / "smoke.yaml"

pytestmark = pytest.mark.slow


@pytest.fixture()
def store(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.fixture(autouse=True)
def _ray_env():
    with ray_test_env("cssl_tune_test"):
        yield


def write_space(path: Path, **changes) -> Path:
    """An in-process (workers 0) variant of the smoke space: fast trials, no Ray Train start."""
    space = {
        "name": path.stem,
        "dataset": "synthetic",
        "labelled_fraction": 0.25,
        "base": str(ROOT / "configs" / "smoke.yaml"),
        "config": {"train": {"max_rounds": 3, "num_threads": 1}},
        "search": {"contrastive.tau": {"loguniform": [0.05, 0.5]}},
        "metric": "val_dice_mean",
        "mode": "max",
        "num_samples": 2,
        "scheduler": {"name": "fifo"},
        "resources": {"workers": 0, "cpus_per_worker": 1},
        "max_concurrent_trials": 1,
        "ablation": {"seeds": 2},
    }
    space.update(changes)
    path.write_text(yaml.safe_dump(space))
    return path


def children(uri: str, experiment: str, kind: str | None = None) -> list[dict]:
    parent = latest_parent(uri, experiment, kind=kind)
    assert parent is not None
    return find_runs(uri, experiment, parent_id=parent["run_id"])


def test_tune_smoke_space_train_inside_tune(tmp_path, store, capsys):
    """tune_spaces/smoke.yaml: 2 trials, each a 1-worker Ray Train run inside a Tune trial."""
    space = yaml.safe_load(SMOKE_SPACE.read_text())
    assert space["resources"]["workers"] == 1 and space["num_samples"] == 2
    code = tune.main(["--space", str(SMOKE_SPACE), "--storage-path", str(tmp_path / "tune"),
                      "--tracking-uri", store])
    out = capsys.readouterr().out
    assert code == 0, out
    runs = children(store, space.get("name", "smoke"), kind="tune")
    assert len(runs) == 2
    searched = list(space["search"])
    smoke_cfg = load_config(ROOT / "configs" / "smoke.yaml")
    rounds, epochs = smoke_cfg.train.max_rounds, smoke_cfg.train.supervised_epochs
    for run in runs:
        assert run["status"] == "FINISHED"
        assert run["tags"]["cssl.kind"] == "trial" and run["tags"]["cssl.early_stopped"] == "false"
        for key in searched:  # the searched value is the run's param, as the trial used it
            assert key in run["params"]
            assert run["params"][key] == run["tags"][f"param.{key}"]
        # one report per stage-A epoch (as in-process trials) + one per round, with per-round training metrics
        history = metric_history(store, run["run_id"], "val_dice_mean")
        assert [step for step, _ in history] == list(range(1, epochs + rounds + 1))
        assert len(metric_history(store, run["run_id"], "omega")) == rounds
        assert "test_dice_mean" in run["metrics"] and "patches_per_s" in run["metrics"]
    best = tmp_path / "tune" / f"{space.get('name', 'smoke')}-tune" / "best_config.yaml"
    assert best.exists() and load_config(best).data.name == "synthetic"
    assert "best trial" in out and "mlflow ui --backend-store-uri" in out


def test_asha_stops_a_poor_trial_early(tmp_path, store):
    """A space built for it: lr 1e-9 learns nothing, so ASHA stops such trials at the first rung."""
    path = write_space(tmp_path / "asha.yaml", num_samples=1, metric="val_loss", mode="min",
                       search={"optim.lr": {"grid": [1e-9, 0.02, 1e-9]}},
                       config={"train": {"max_rounds": 3, "num_threads": 1}},
                       scheduler={"name": "asha", "grace_period": 1, "reduction_factor": 2})
    assert tune.main(["--space", str(path), "--storage-path", str(tmp_path / "tune"), "--tracking-uri", store]) == 0
    runs = children(store, "asha", kind="tune")
    assert len(runs) == 3 and all(r["status"] == "FINISHED" for r in runs)
    stopped = [r for r in runs if r["tags"]["cssl.early_stopped"] == "true"]
    assert stopped, [(r["params"]["optim.lr"], r["tags"]["cssl.early_stopped"]) for r in runs]
    for r in stopped:
        assert float(r["params"]["optim.lr"]) == 1e-9
        assert len(metric_history(store, r["run_id"], "omega")) < 3  # fewer rounds than max_rounds
        assert "test_dice_mean" not in r["metrics"]
    good = [r for r in runs if float(r["params"]["optim.lr"]) == 0.02]
    assert good[0]["tags"]["cssl.early_stopped"] == "false" and "test_dice_mean" in good[0]["metrics"]


def test_resume_after_the_driver_is_killed(tmp_path, store):
    """Kill the driver (and its Ray) while trial 2 of 2 runs; --resume finishes without rerunning trial 1."""
    path = write_space(tmp_path / "resume.yaml", num_samples=2,
                       config={"train": {"max_rounds": 6, "num_threads": 1}})
    cmd = [sys.executable, "-m", "cssl_ray.tune", "--space", str(path), "--storage-path", str(tmp_path / "tune"),
           "--tracking-uri", store]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    runs_root = tmp_path / "tune" / "resume-tune" / "runs"
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline:  # trial 1 finished and trial 2 has a round checkpoint
            done = [d for d in runs_root.glob("*") if (d / "result.json").exists()] if runs_root.exists() else []
            running = [d for d in runs_root.glob("*") if list(d.glob("round_*.pt")) and d not in done] \
                if runs_root.exists() else []
            if done and running:
                break
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            time.sleep(0.5)
        else:
            pytest.fail("trial 2 never started")
        first = done[0]
        first_mtime = (first / "result.json").stat().st_mtime
        time.sleep(2.5)  # Tune writes its experiment state every 2 s (TUNE_GLOBAL_CHECKPOINT_S)
    finally:
        procs = [pid for pid in descendant_processes() if pid != os.getpid()]
        os.killpg(proc.pid, signal.SIGKILL)
        for pid in procs:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()
    resumed = subprocess.run(cmd + ["--resume"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    runs = children(store, "resume", kind="tune")
    assert len(runs) == 2, [r["tags"].get("cssl.trial_key") for r in runs]  # reopened, not duplicated
    assert all(r["status"] == "FINISHED" for r in runs)
    assert all("test_dice_mean" in r["metrics"] for r in runs)
    assert (first / "result.json").stat().st_mtime == first_mtime  # the finished trial did not run again
    parent = latest_parent(store, "resume", kind="tune")
    assert parent["status"] == "FINISHED"
    assert not [r for r in find_runs(store, "resume") if r["status"] == "RUNNING"]


def test_bad_space_is_one_line_before_ray(tmp_path, store, capsys):
    path = write_space(tmp_path / "bad.yaml", search={"contrastive.taux": {"uniform": [0.1, 0.2]}})
    code = tune.main(["--space", str(path), "--storage-path", str(tmp_path / "tune"), "--tracking-uri", store])
    err = own_lines(capsys.readouterr().err)  # Ray of the module's earlier tests may still forward logs
    assert code == 2 and len(err) == 1 and "contrastive.taux" in err[0]
    assert not (tmp_path / "mlflow.db").exists()


def test_missing_dataset_is_one_line(tmp_path, store, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # data/monuseg does not exist here
    code = tune.main(["--space", str(ROOT / "tune_spaces" / "monuseg.yaml"), "--storage-path", str(tmp_path / "t"),
                      "--tracking-uri", store])
    err = own_lines(capsys.readouterr().err)
    assert code == 2 and len(err) == 1 and "monuseg" in err[0].lower()


            uri=uri, storage=Path(args.storage_path), scheduler=scheduler, search_alg=search_alg,
            num_samples=space.num_samples, address=args.address, resume=args.resume, threads=args.threads,
            warned=warned)
