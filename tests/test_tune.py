"""cssl_ray.experiments.tune end to end on CPU, against a temporary MLflow store (ablate: tests/test_demo.py).

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

from cssl_ray.config import load_config
from cssl_ray.experiments import tune
from cssl_ray.tracking.runs import find_runs, latest_parent, metric_history

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
    """tune_spaces/smoke.yaml, one trial (CI time: a second Train-inside-Tune trial adds ~35 s and no
    coverage): a 1-worker Ray Train run inside a Tune trial."""
    space = yaml.safe_load(SMOKE_SPACE.read_text())
    assert space["resources"]["workers"] == 1
    code = tune.main(["--space", str(SMOKE_SPACE), "--storage-path", str(tmp_path / "tune"),
                      "--tracking-uri", store, "--num-samples", "1"])
    out = capsys.readouterr().out
    assert code == 0, out
    runs = children(store, space.get("name", "smoke"), kind="tune")
    assert len(runs) == 1
    searched = list(space["search"])
    smoke_cfg = load_config(ROOT / "configs" / "smoke.yaml")
    rounds, epochs = smoke_cfg.train.max_rounds, smoke_cfg.train.stage_a_steps  # epochs of one step (2 labelled)
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
    # the parent run holds the best config; the best trial's model is registered under the space's name
    from cssl_ray.tracking.uri import client
    parent = latest_parent(store, "smoke", kind="tune")
    assert "best_config.yaml" in {a.path for a in client(store).list_artifacts(parent["run_id"])}
    assert runs[0]["tags"]["cssl.model_uri"].startswith("models:/m-") and "model:  models:/smoke/1" in out
    assert client(store).get_model_version("smoke", "1").run_id == runs[0]["run_id"]
    tags = client(store).get_experiment_by_name("smoke").tags
    assert "mlflow.sharedViewState.cssl-tune-runs" in tags and "viewStateShareKey=cssl-tune-cells" in out


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


def test_init_ray_pins_its_address_for_every_process_of_it(monkeypatch):
    """Ray code that looks its cluster up without an address (Train V2's PlacementGroupCleaner:
    ray.util.state.get_actor every second) raised "Found multiple active Ray instances" beside another
    experiment's Ray; init_ray pins RAY_ADDRESS in the processes of the instance it starts, detached
    actors of actors with their own runtime env included, and shutdown_ray restores the driver's."""
    import ray

    from cssl_ray.distributed.ray_init import init_ray, shutdown_ray

    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:1")  # someone else's; a local start must not join it
    assert init_ray(None, 1, log_to_driver=False)
    try:
        gcs = ray.get_runtime_context().gcs_address
        assert os.environ["RAY_ADDRESS"] == gcs

        @ray.remote(num_cpus=0)
        class Detached:
            def address(self) -> str | None:
                return os.environ.get("RAY_ADDRESS")

        @ray.remote(num_cpus=0, runtime_env={"env_vars": {"CSSL_X": "1"}})  # as Train's controller
        class Controller:
            def cleaner_address(self) -> tuple[str | None, str | None]:
                a = Detached.options(lifetime="detached").remote()
                try:
                    return ray.get(a.address.remote()), os.environ.get("CSSL_X")
                finally:
                    ray.kill(a)

        assert ray.get(Controller.remote().cleaner_address.remote()) == (gcs, "1")
    finally:
        shutdown_ray()
    assert os.environ["RAY_ADDRESS"] == "10.0.0.1:1"


# module level: the resumed run's callback is Tune's unpickled copy, whose log (this module's function,
# pickled by reference) must see the hook disarmed
_INTERRUPT = {"after": 0, "finished": 0}


def _interrupt_after(line: str) -> None:
    """The MLflow callback's log: Ctrl-C (SIGINT to this driver) once ``after`` trials have finished."""
    print(line, flush=True)
    if _INTERRUPT["after"] and " finished round " in line:
        _INTERRUPT["finished"] += 1
        if _INTERRUPT["finished"] == _INTERRUPT["after"]:
            _INTERRUPT["after"] = 0  # once: the resumed run reuses this callback
            os.kill(os.getpid(), signal.SIGINT)  # Tune's handler saves the experiment and returns


def test_optuna_search_in_range_and_resumed_without_repeats(tmp_path, store, capsys, monkeypatch):
    """search_algorithm: optuna, 4 trials one at a time, Ctrl-C after 2 finished, then --resume: the
    2 finished trials are kept (same ids, params, files), the 2 new ones continue the seeded search
    (the restored searcher's 3rd and 4th suggestions, not its 1st and 2nd again), all in range."""
    from cssl_ray.experiments.search_space import load_space
    from cssl_ray.tracking import progress

    search = {"contrastive.tau": {"loguniform": [0.05, 0.5]}, "pseudo.threshold": {"choice": [0.7, 0.8, 0.9]},
              "train.steps_per_round": {"randint": [1, 3]}}
    path = write_space(tmp_path / "opt.yaml", search=search, num_samples=4, search_algorithm="optuna", seed=3,
                       config={"train": {"max_rounds": 1, "stage_a_steps": 1, "num_threads": 1}})
    argv = ["--space", str(path), "--storage-path", str(tmp_path / "tune"), "--tracking-uri", store]
    monkeypatch.setattr(progress, "say", _interrupt_after)
    monkeypatch.setitem(_INTERRUPT, "after", 2)
    runs_root = tmp_path / "tune" / "opt-tune" / "runs"
    with local_ray():  # both commands use it (one Ray start less); the resume reads only the folder
        assert tune.main(argv) == 130
        assert "interrupted with 2 of 4 trial(s) done" in capsys.readouterr().err
        first = {d.name: (d / "result.json").stat().st_mtime for d in runs_root.glob("*")
                 if (d / "result.json").exists()}
        assert len(first) == 2
        before = {r["tags"]["cssl.trial_id"]: r for r in children(store, "opt", kind="tune")}
        assert not (tmp_path / "tune" / "opt-tune" / "best_config.yaml").exists()
        assert not [r for r in find_runs(store, "opt") if r["status"] == "RUNNING"]
        assert latest_parent(store, "opt", kind="tune")["status"] == "KILLED"

        assert tune.main(argv + ["--resume"]) == 0
    runs = sorted(children(store, "opt", kind="tune"), key=lambda r: r["start_time"])  # one at a time: asked order
    assert len(runs) == 4 and all(r["status"] == "FINISHED" and "test_dice_mean" in r["metrics"] for r in runs)
    for trial_id, mtime in first.items():  # the finished trials did not run again
        assert (runs_root / trial_id / "result.json").stat().st_mtime == mtime
        assert {k: v for k, v in before[trial_id]["tags"].items() if k.startswith("param.")} == \
            {k: v for k, v in next(r for r in runs if r["tags"]["cssl.trial_id"] == trial_id)["tags"].items()
             if k.startswith("param.")}
    params = [(float(r["tags"]["param.contrastive.tau"]), float(r["tags"]["param.pseudo.threshold"]),
               int(r["tags"]["param.train.steps_per_round"])) for r in runs]
    for tau, threshold, steps in params:  # inside the domains the corner check covered
        assert 0.05 <= tau <= 0.5 and threshold in (0.7, 0.8, 0.9) and steps in (1, 2)
    space = load_space(path)  # the same seeded searcher, driven by hand: the trials are its first 4 suggestions
    searcher = tune.make_searcher(space)
    searcher.set_search_properties(space.metric, space.mode, space.param_space())
    suggested = []
    for i, run in enumerate(runs):
        s = searcher.suggest(f"t{i}")
        suggested.append((s["contrastive.tau"], s["pseudo.threshold"], s["train.steps_per_round"]))
        searcher.on_trial_complete(f"t{i}", {space.metric: run["metrics"].get(space.metric, 0.0)})
    assert params == suggested and len(set(params)) == 4
    assert latest_parent(store, "opt", kind="tune")["status"] == "FINISHED"


@pytest.mark.parametrize("cli", ["tune", "ablate"])
def test_optuna_space_wiring_and_dry_run(cli, tmp_path, store, capsys, monkeypatch):
    """tune hands run_experiment the space's OptunaSearch and names it in its dry run; ablate keeps Tune's
    variant generator (no search_alg) whatever the space says. No Ray: run_experiment is replaced."""
    import importlib

    main = importlib.import_module(f"cssl_ray.experiments.{cli}")
    path = write_space(tmp_path / "opt.yaml", search_algorithm="optuna", seed=4)
    argv = ["--space", str(path), "--storage-path", str(tmp_path / "s"), "--tracking-uri", store]
    assert main.main(argv + ["--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("dry run: ") and out.count("\n") == 1
    assert ("Optuna TPE search (seed 4), FIFO" in out) == (cli == "tune")
    seen = {}

    def fake_run_experiment(space, **kwargs):
        seen.update(kwargs)
        return [], "parent"

    monkeypatch.setattr(main, "run_experiment", fake_run_experiment)
    main.main(argv)
    if cli == "tune":
        assert type(seen["search_alg"]).__name__ == "OptunaSearch" and seen["search_alg"].metric == "val_dice_mean"
        capsys.readouterr()
        assert main.main(argv + ["--resume", "--num-samples", "8"]) == 2  # Tune would keep the first count
        assert "--num-samples: a resumed experiment keeps" in capsys.readouterr().err
    else:
        assert seen.get("search_alg") is None and seen["param_space"]["cell"]["grid_search"]
