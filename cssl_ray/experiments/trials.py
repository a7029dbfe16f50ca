"""One Ray Tune experiment of CSSL runs, recorded in MLflow: what ``tune`` and ``ablate`` share.

    driver   run_experiment: Tuner(trial, param_space) -> trials run concurrently as resources
             allow -> the MLflow callback (driver side, the only writer; ``trial_recorder``)
             records every trial
    trial    ``trainable.run_trial``: one CSSL run from the space's base config + the trial's
             parameters, in the trial's own process or as Train-inside-Tune
    checks   ``trial_checks.check_trials``: what a trial would fail on, one line before Ray starts

A trial writes its run folder (config.yaml, split.json, round checkpoints, best.pt, result.json,
figures/) under ``<storage>/<experiment>/runs/<trial id>``; test metrics are computed once, on
the best-validation weights, and read from result.json by the driver, which logs them and the
files as MLflow artifacts. On a multi-node cluster ``--storage-path`` must therefore be a folder
every node shares (NFS, a mounted bucket).

Resuming: Tune keeps the experiment's state under its folder; ``resume=True`` restores it, so
finished trials are not rerun and unfinished ones restart from their own newest round checkpoint
(local trials) or Train checkpoint (Train trials). MLflow runs are keyed by trial id and reopened.
The search algorithm is restored with it (Tune saves the searcher's state beside the experiment's):
a resumed Optuna search continues its study and proposes new trials, not its first ones again; the
algorithm stays the one the experiment started with, whatever the space says now.
"""
from __future__ import annotations

import json
import math
import os
import sys
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cssl_ray.config import Config, ConfigError, to_dict
from cssl_ray.distributed.placement import concurrent_trials, trial_bundles, trial_demand
from cssl_ray.experiments.search_space import Space
from cssl_ray.experiments.trainable import TrialSpec, run_trial, trials_label
from cssl_ray.experiments.trial_recorder import make_callback
from cssl_ray.tracking.progress import ENDED
from cssl_ray.tracking.run_record import cells_view, read_result, runs_view, selected_value

SESSION_FILE = "cssl_session.json"
# Tune writes its experiment state at most this often; a killed driver loses at most that much.
os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")
# Tune's own output engine prints a configuration table and result paths even at verbose=0; the
# legacy one prints nothing at verbose=0. The MLflow callback prints the experiment's lines.
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")


@dataclass
class TrialOutcome:
    trial_id: str
    params: dict[str, Any]
    status: str
    out_dir: Path
    test: dict[str, float] = field(default_factory=dict)
    best_val: dict[str, float] = field(default_factory=dict)
    metric_analysis: dict[str, dict[str, float]] = field(default_factory=dict)  # Tune's max/min/last per metric
    early_stopped: bool = False


def session_id(folder: Path, resume: bool) -> str:
    """The id that ties an experiment folder to its MLflow parent run (kept across resumes)."""
    path = folder / SESSION_FILE
    if resume and path.exists():
        return json.loads(path.read_text())["session"]
    folder.mkdir(parents=True, exist_ok=True)
    session = uuid.uuid4().hex
    path.write_text(json.dumps({"session": session}))
    return session


def say(line: str) -> None:
    print(line, flush=True)


def experiment_folder(storage: Path, tune_name: str, resume: bool) -> Path:
    """``<storage>/<tune_name>`` (absolute); a ConfigError when it holds an experiment and not ``resume``."""
    folder = storage.resolve() / tune_name
    if not resume and folder.exists():
        raise ConfigError(f"{folder} already holds an experiment; pass --resume to continue it, "
                          "or another --storage-path (ablate: --name) to start another")
    return folder


def grid_size(param_space: dict[str, Any]) -> int:
    """Trials per sample of ``param_space``: the product of its grid_search lengths."""
    return math.prod(len(v["grid_search"]) for v in param_space.values() if isinstance(v, dict) and "grid_search" in v)


def run_experiment(space: Space, *, param_space: dict[str, Any], kind: str, tune_name: str, base: Config,
                   uri: str, storage: Path, scheduler: Any = None, search_alg: Any = None, num_samples: int = 1,
                   address: str | None = None, resume: bool = False, parent_tags: dict[str, str] | None = None,
                   threads: int = 0, log: Callable[[str], None] | None = None,
                   warned: Iterable[str] = ()) -> tuple[list[TrialOutcome], str]:
    """Run (or resume) one Tune experiment of CSSL trials; returns every trial's outcome and the parent run id.
    Raises ``Interrupted`` (after closing the MLflow runs KILLED) when Ctrl-C stopped it early.

    Args:
        space: the loaded search space (resources, metric/mode, max concurrent trials, name).
        param_space: Tune's param_space (dotted config keys and/or ``cell``); constants allowed.
        kind: "tune" or "ablate" (the parent run's cssl.kind; children get "trial" / "ablation").
        tune_name: the Tune experiment folder under ``storage``.
        base: the config every trial starts from.
        uri: MLflow tracking URI (absolute).
        search_alg: a Tune searcher (``tune.make_searcher``); None = Tune's variant generator, which
            ``ablate`` always uses (its grid of cells x seeds must run every cell).
        log: where the experiment's lines go (None: printed, with a bar over trials on a terminal).
        warned: warning texts already shown (``check_trials``); trials' other warnings are shown once.

    Ray's worker processes print to Ray's log files only (``init_ray(log_to_driver=False)``); a failed
    trial's first error line is on its ``done`` line, its traceback in Tune's error file.
    """
    import ray
    from ray import tune

    from cssl_ray.distributed.ray_init import init_ray, shutdown_ray
    from cssl_ray.tracking.tracker import Tracker, git_commit
    from cssl_ray.tracking.uri import ui_address, ui_command

    storage = storage.resolve()
    folder = experiment_folder(storage, tune_name, resume)
    # Ray first: the cap on concurrent trials needs the cluster's resources (cssl_ray.distributed.placement says
    # why it prevents deadlock), and a trial that never fits is one line before anything is written.
    labelling = trials_label(base, param_space)
    demand = trial_demand(space.resources, labelling)
    started = init_ray(address, space.max_concurrent_trials * demand.cpus, log_to_driver=False)
    try:
        concurrent = concurrent_trials(space.max_concurrent_trials, demand, ray.cluster_resources(),
                                       can_grow=address is not None, log=log or say)
    except ConfigError:
        if started:
            shutdown_ray()
        raise
    runs_root = folder / "runs"
    session = session_id(folder, resume)
    tracker = Tracker(uri, space.name)
    tags = {"cssl.kind": kind, "cssl.space": str(space.path), "cssl.dataset": space.dataset,
            "cssl.git_commit": git_commit(), **(parent_tags or {})}
    parent_id = tracker.start_parent(f"{kind}:{tune_name}", tags, session=session)
    # the UI's views of this experiment's runs, one pair per kind (the latest search, the latest ablation)
    table = tracker.share_view(f"cssl-{kind}-runs", f"cssl: {kind} runs", runs_view(space.metric, parent_id))
    cells = tracker.share_view(f"cssl-{kind}-cells", f"cssl: {kind} cells", cells_view(space.metric, parent_id))
    if resume:  # runs a killed driver left RUNNING: interrupted; restarted trials reopen theirs
        tracker.close_open_runs("KILLED", parent_id=parent_id)
        tracker.start_parent(f"{kind}:{tune_name}", tags, session=session)

    child_kind = "trial" if kind == "tune" else "ablation"
    callback = make_callback(uri, space.name, parent_id, to_dict(base), runs_root,
                             {"cssl.kind": child_kind, "cssl.space": space.name,
                              "cssl.git_commit": tags["cssl.git_commit"]},
                             space.metric, space.mode, log,
                             total=num_samples * grid_size(param_space), warned=warned)
    spec = TrialSpec(base=to_dict(base), runs_root=str(runs_root), resources=space.resources, threads=threads)
    # Train trials: the driver's 0.01 CPU and the labellers; Tune admits a trial when they fit
    trial_resources = tune.PlacementGroupFactory(trial_bundles(space.resources, labelling))
    trainable = tune.with_resources(tune.with_parameters(run_trial, spec=spec), trial_resources)
    interrupted = True
    try:
        if resume and tune.Tuner.can_restore(str(folder)):
            tuner = tune.Tuner.restore(str(folder), trainable, resume_unfinished=True, resume_errored=False,
                                       restart_errored=False, param_space=param_space)
        else:
            tuner = tune.Tuner(
                trainable, param_space=param_space,
                tune_config=tune.TuneConfig(metric=space.metric, mode=space.mode, num_samples=num_samples,
                                            scheduler=scheduler, search_alg=search_alg,
                                            max_concurrent_trials=concurrent),
                run_config=tune.RunConfig(name=tune_name, storage_path=str(storage), callbacks=[callback],
                                          verbose=0, failure_config=tune.FailureConfig(max_failures=0)))
        grid = tuner.fit()
        # Ctrl-C (SIGINT): Tune catches it, saves the experiment and returns early, with trials
        # unfinished or not yet created
        trials = grid._experiment_analysis.trials
        interrupted = bool(unfinished(trials)) or len(trials) < num_samples * grid_size(param_space)
    finally:
        if not interrupted:
            tracker.end(parent_id, "FINISHED")
            tracker.close_open_runs("FAILED", parent_id=parent_id)  # a child the callback missed
        else:  # Ctrl-C or an error in the driver: nothing stays RUNNING; --resume continues
            tracker.close_open_runs("KILLED", parent_id=parent_id)
        if started:
            shutdown_ray()
    if interrupted:
        done = len(trials) - len(unfinished(trials))
        raise Interrupted(f"interrupted with {done} of {num_samples * grid_size(param_space)} trial(s) done; the "
                          f"same command with --resume continues (done trials are kept)")
    outcomes = []
    for trial in trials:  # Trial objects: status, config, metric_analysis
        out_dir = runs_root / trial.trial_id
        result = read_result(out_dir)
        outcomes.append(TrialOutcome(
            trial_id=trial.trial_id, params=dict(trial.config), status=trial.status, out_dir=out_dir,
            test=result.get("test", {}), best_val=result.get("best_val", {}),
            metric_analysis=dict(trial.metric_analysis or {}),
            early_stopped=trial.status == "TERMINATED" and not result))
    (log or say)(f"MLflow: experiment {space.name!r}, parent run {parent_id}; open it with:\n  {ui_command(uri)}"
                 f"\n  runs (cell, seed, data, test metrics): {ui_address(uri)}{table}"
                 f"\n  cells side by side (mean over seeds):  {ui_address(uri)}{cells}&compareRunsMode=CHART")
    return outcomes, parent_id


def register_best(uri: str, experiment: str, parent_id: str, best: TrialOutcome, name: str) -> str | None:
    """Register ``best``'s logged model as a new version of ``name``; its ``models:/`` URI (None
    when the trial logged no model)."""
    from cssl_ray.tracking.mlflow_model import MODEL_URI_TAG, register_model
    from cssl_ray.tracking.runs import KEY_TAG, find_runs

    runs = find_runs(uri, experiment, parent_id=parent_id, tags={KEY_TAG: best.trial_id})
    model_uri = runs[0]["tags"].get(MODEL_URI_TAG) if runs else None
    if model_uri is None:
        return None
    version = register_model(uri, model_uri, name, runs[0]["run_id"])
    return f"models:/{name}/{version}"


def log_parent_files(uri: str, experiment: str, parent_id: str, paths: list[Path],
                     artifact_path: str | None = None) -> None:
    """Attach files (the report, the best config) to an experiment's parent run."""
    from cssl_ray.tracking.tracker import Tracker
    tracker = Tracker(uri, experiment)
    for path in paths:
        tracker.log_artifact(parent_id, path, artifact_path)


class Interrupted(Exception):
    """The experiment stopped early (Ctrl-C); its state is saved and ``resume=True`` continues it."""


def unfinished(trials: list) -> list:
    """Tune trials that neither ended nor failed."""
    return [t for t in trials if t.status not in ENDED]


def best_outcome(outcomes: list[TrialOutcome], metric: str, mode: str) -> TrialOutcome | None:
    """The finished trial (test metrics present) whose kept weights have the best validation
    ``metric`` (``selected_value``); ties (a flat metric, such as nuclei's micronucleus Dice at 0) go
    to the best val_dice_mean, as within a run (``TrainConfig.selection_order``)."""
    def value(o: TrialOutcome, key: str, how: str) -> float:
        v = selected_value(o.best_val, o.metric_analysis, key, how)
        return -math.inf if math.isnan(v) else (v if how == "max" else -v)

    finished = [o for o in outcomes if o.test]
    return max(finished, key=lambda o: (value(o, metric, mode), value(o, "val_dice_mean", "max"))) \
        if finished else None


def fail(prog: str, message: str) -> int:
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 2
