"""One Ray Tune experiment of CSSL runs, recorded in MLflow: what ``tune`` and ``ablate`` share.

    driver   run_experiment: Tuner(trial, param_space) -> trials run concurrently as resources
             allow -> the MLflow callback (driver side, the only writer) records every trial
    trial    run_trial: one CSSL run from the space's base config + the trial's parameters;
             workers == 0 trains in the trial's own process (cssl_ray.run.local), workers >= 1 builds
             and fits a TorchTrainer inside the trial (Ray Train V2's Train-inside-Tune pattern)
             whose rank-0 reports reach Tune through TuneReportCallback. Either way Tune sees one
             result per validation (every stage-A epoch as round 0, then every round), with
             ``round`` (ASHA's time attribute) and ``step``; the base config carries the space's
             metric as ``train.select_metric`` (``Space.select``), so each trial's best weights
             and test metrics follow the criterion that ranks it.

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

import dataclasses
import json
import math
import os
import sys
import uuid
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cssl_ray.config import Config, ConfigError, from_dict, merge, to_dict
from cssl_ray.distributed.placement import Resources, concurrent_trials, stream_resources, trial_bundles, trial_demand
from cssl_ray.distributed.preflight import check_fits_here, check_shared_paths, check_worker_gpus, dataset_paths
from cssl_ray.experiments.search_space import ABLATION_CELLS, CELL_DATA, Space, cell_of, unflatten
from cssl_ray.tracking.progress import ENDED, TrialProgress, record_warnings, run_warnings, warning_text
from cssl_ray.tracking.run_record import cells_view, read_result, record_result, runs_view

if TYPE_CHECKING:  # torch: the CLIs import this module before their arguments are checked
    from cssl_ray.data.bundle import DataSource

CELL_KEY = "cell"  # a trial parameter naming an ablation cell (sets the three switches)
SESSION_FILE = "cssl_session.json"
TRIAL_WARNINGS = "warnings.json"  # a trial's Python warnings (cssl_ray.tracking.progress)
# Tune writes its experiment state at most this often; a killed driver loses at most that much.
os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")
# Tune's own output engine prints a configuration table and result paths even at verbose=0; the
# legacy one prints nothing at verbose=0. The MLflow callback prints the experiment's lines.
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")


@dataclass
class TrialSpec:
    """What every trial of an experiment shares (sent once through the object store)."""

    base: dict[str, Any]  # to_dict(the base Config)
    runs_root: str  # absolute; trial folders go below it
    resources: Resources
    threads: int = 0  # torch threads per in-process trial (0 = the config's train.num_threads)


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


def trial_config(base: dict[str, Any], params: dict[str, Any]) -> Config:
    """The base config with a trial's parameters applied (dotted keys; ``cell`` = ablation switches)."""
    extra = {k: v for k, v in params.items() if k != CELL_KEY}
    cfg_dict = merge(base, unflatten(extra))
    if CELL_KEY in params:
        cell = params[CELL_KEY]
        cfg_dict = merge(cfg_dict, {"train": dict(ABLATION_CELLS[cell]), "data": dict(CELL_DATA.get(cell, {}))})
    return from_dict(cfg_dict)


def run_trial(params: dict[str, Any], spec: TrialSpec) -> None:
    """A Tune function trainable: one CSSL run, one Tune result per validation.

    The last round's result is held back until the run has written its test metrics (result.json):
    ASHA stops any trial whose report reaches max_t, and a stop there would otherwise cut the
    test evaluation off a trial that finished every round. Python warnings the trial raises go to
    ``<run folder>/warnings.json`` as they are raised; the driver shows each once (cssl_ray.tracking.progress).
    """
    from ray import tune

    trial_id = tune.get_context().get_trial_id()
    out_dir = Path(spec.runs_root) / trial_id
    with record_warnings(out_dir / TRIAL_WARNINGS):
        _run_trial(params, spec, out_dir)


def _run_trial(params: dict[str, Any], spec: TrialSpec, out_dir: Path) -> None:
    from ray import tune

    cfg = trial_config(spec.base, params)
    train = dataclasses.replace(cfg.train, out_dir=str(out_dir), progress=False,
                                num_threads=spec.threads or cfg.train.num_threads)
    cfg = dataclasses.replace(cfg, train=train)
    last_round = cfg.train.last_round()
    held: list[dict[str, Any]] = []

    def report(record: dict[str, Any]) -> None:
        if is_last_round(record, last_round):
            held.append(record)
        else:
            tune.report(tune_metrics(record, 0))

    if spec.resources.workers == 0:
        from cssl_ray.run.local import run_local
        # resume: a restarted trial continues its rounds; trials whose stage A is identical (cells of
        # one seed, trials that search only what comes after it, a search and the ablation after it)
        # train it once per storage path: the cache key holds everything stage A depends on
        run_local(cfg, resume=True, log=report, stage_a_cache=Path(spec.runs_root).parent.parent / "stage_a")
    else:
        import ray

        from cssl_ray.distributed.ray_train import run_ray
        r = spec.resources
        group = ray.util.get_current_placement_group()  # the trial's: its last bundles are the labellers'
        if group is None:
            raise RuntimeError("a Train trial runs outside its placement group; Tune would not see its labellers")
        result = run_ray(cfg, workers=r.workers, gpus_per_worker=r.gpus_per_worker,
                         cpus_per_worker=r.cpus_per_worker, resume=True, max_failures=1,
                         callbacks=[_tune_forwarder(last_round)], resources=stream_resources(r),
                         labeller_group=group)
        if result.history and is_last_round(result.history[-1], last_round):
            held.append(result.history[-1])
    for record in held:
        tune.report(tune_metrics(record, 0))


def is_last_round(record: dict[str, Any], last_round: int) -> bool:
    return record.get("stage") == "round" and record.get("round") == last_round


def _tune_forwarder(last_round: int) -> Any:
    """Ray Train's TuneReportCallback (rank 0's reports -> this Tune trial), minus the last round's."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class ForwardAllButLastRound(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint) -> None:
            if metrics and is_last_round(metrics[0], last_round):
                return  # reported by the trial itself after the test metrics exist
            super().after_report(run_context, metrics, checkpoint)

    return ForwardAllButLastRound()


def tune_metrics(record: dict[str, Any], step: int) -> dict[str, float]:
    """Numeric entries of a run record, plus ``step`` (validation index); ``round`` is always there."""
    out = {k: float(v) for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    out.setdefault("round", 0.0)
    out["step"] = float(record.get("step", step))
    return out


# ---------------------------------------------------------------------------------------------
# Driver side


def session_id(folder: Path, resume: bool) -> str:
    """The id that ties an experiment folder to its MLflow parent run (kept across resumes)."""
    path = folder / SESSION_FILE
    if resume and path.exists():
        return json.loads(path.read_text())["session"]
    folder.mkdir(parents=True, exist_ok=True)
    session = uuid.uuid4().hex
    path.write_text(json.dumps({"session": session}))
    return session


def make_callback(uri: str, experiment: str, parent_id: str, base: dict[str, Any], runs_root: Path,
                  base_tags: dict[str, str], metric: str, mode: str, log: Callable[[str], None] | None = None,
                  total: int = 1, warned: Iterable[str] = (), bar: bool | None = None):
    """The driver-side Tune callback that records trials in MLflow and prints the experiment's lines
    (built here: ray.tune is lazy). ``total``: the experiment's trials (num_samples x grid size);
    ``warned``: warning texts the driver has already shown; ``bar``: the bar over trials (None: when
    stdout is a terminal and ``log`` is None). ``log`` None: print."""
    from ray import tune

    class MLflowRecorder(tune.Callback):
        """Every trial -> one child run: params, metrics per result, test metrics, files, status.

        Runs in the driver (Tune's controller), so only the driver writes to MLflow. A trial that
        errors ends FAILED; one ASHA stopped ends FINISHED with tag cssl.early_stopped=true.
        Also prints one line per trial start and end, each new warning and the bar over trials
        (``cssl_ray.tracking.progress``; Tune's own output is off: verbose=0).
        """

        def __init__(self) -> None:
            self.runs: dict[str, str] = {}
            self._tracker = None
            self.progress = TrialProgress(total, log, bar=bar, warned=warned)

        @property
        def tracker(self):
            if self._tracker is None:
                from cssl_ray.tracking.store import Tracker
                self._tracker = Tracker(uri, experiment)
            return self._tracker

        def __getstate__(self) -> dict[str, Any]:  # Tune pickles callbacks with its state
            return {"runs": self.runs, "_tracker": None, "progress": self.progress}

        def on_trial_start(self, iteration, trials, trial, **info) -> None:
            self._open(trial)
            self.progress.write(self.progress.start_line(trials, trial.trial_id,
                                                         trial_name(trial.trial_id, trial.config)))

        def on_experiment_end(self, trials, **info) -> None:
            self.progress.close()

        def _open(self, trial) -> str:
            if trial.trial_id in self.runs:
                return self.runs[trial.trial_id]
            from cssl_ray.tracking.store import flatten_config
            params = dict(trial.config)
            cfg = trial_config(base, params)
            # the labelled share of the experiment, also for a reference cell that labels everything
            nominal = trial_config(base, {k: v for k, v in params.items() if k != CELL_KEY})
            tags = {**base_tags, **run_tags(cfg, params.get(CELL_KEY), nominal), "cssl.trial_id": trial.trial_id,
                    **{f"param.{k}": str(v) for k, v in params.items()}}
            name = trial_name(trial.trial_id, params)
            run_id = self.tracker.start_child(parent_id, trial.trial_id, name, flatten_config(to_dict(cfg)), tags)
            self.runs[trial.trial_id] = run_id
            return run_id

        def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
            run_id = self._open(trial)
            metrics = {k: v for k, v in result.items() if k not in _TUNE_KEYS and k != "step"}
            self.tracker.log_metrics(run_id, metrics, step=int(result.get("step", 0)))
            self.progress.warn(trial.trial_id, run_warnings(runs_root / trial.trial_id))

        def on_trial_complete(self, iteration, trials, trial, **info) -> None:
            self._close(trials, trial, "FINISHED")

        def on_trial_error(self, iteration, trials, trial, **info) -> None:
            self._close(trials, trial, "FAILED")

        def _close(self, trials, trial, status: str) -> None:
            run_id = self._open(trial)
            out_dir = runs_root / trial.trial_id
            step = int((trial.last_result or {}).get("step", 0))
            cfg = trial_config(base, dict(trial.config))
            raised = run_warnings(out_dir, read_result(out_dir))
            result = record_result(self.tracker, run_id, cfg, out_dir, step, log_model=status == "FINISHED",
                                   warnings=raised)
            self.progress.warn(trial.trial_id, raised)
            early = status == "FINISHED" and not result
            self.tracker.set_tags(run_id, {"cssl.early_stopped": str(early).lower()})
            if status == "FAILED" and trial.error_file:
                self.tracker.set_tags(run_id, {"cssl.error": _first_error_line(trial)})
            self.tracker.end(run_id, status)
            last = trial.last_result or {}
            if status == "FAILED":
                what = f"FAILED: {_first_error_line(trial)}"
            elif early:
                what = f"stopped early by the scheduler after round {int(last.get('round', 0))}"
            else:
                what = f"finished round {int(last.get('round', 0))}"
            best = (trial.metric_analysis or {}).get(metric, {}).get(mode)
            shown = f", best {metric} {best:.4f}" if best is not None else ""
            test = f", test dice_mean {result['test']['dice_mean']:.4f}" if result and "dice_mean" in result["test"] else ""
            self.progress.write(self.progress.end_line(trials, trial.trial_id, f"{what}{shown}{test}"))

    return MLflowRecorder()


_TUNE_KEYS = {"training_iteration", "time_total_s", "episodes_total", "timesteps_total", "node_ip", "hostname",
              "pid", "time_this_iter_s", "timestamp", "date", "time_since_restore", "timesteps_since_restore",
              "iterations_since_restore", "config", "checkpoint_dir_name", "done", "trial_id", "experiment_tag",
              "should_checkpoint", "checkpoint_path"}


def say(line: str) -> None:
    print(line, flush=True)


def _first_error_line(trial) -> str:
    try:
        text = Path(trial.error_file).read_text().strip().splitlines()
        return (text[-1] if text else "unknown error")[:500]
    except OSError:
        return "unknown error"


def run_tags(cfg: Config, cell: str | None = None, nominal: Config | None = None) -> dict[str, str]:
    """Tags of a trial: dataset, the experiment's labelled share (``nominal``'s, so a reference cell
    such as supervised_all sits in its experiment's table), cell (``cell``, else from the switches),
    the schedule (``train.protocol``: a report compares cells of one protocol only)."""
    d, n = cfg.data, (nominal or cfg).data
    return {"cssl.dataset": d.name, "cssl.labelled_fraction": str(n.labelled_fraction),
            "cssl.labelled_count": str(n.labelled_count), "cssl.cell": cell or cell_of(cfg),
            "cssl.seed": str(cfg.train.seed), "cssl.method": _method_tag(cfg), "cssl.protocol": cfg.train.protocol}


def _method_tag(cfg: Config) -> str:
    """What the rounds train on D_U: a baseline's name, ``cssl`` with L_CL and/or L_CR, or ``supervised``."""
    t = cfg.train
    if t.method != "cssl":
        return t.method
    return "cssl" if t.use_cl or t.use_cr else "supervised"


def trial_name(trial_id: str, params: dict[str, Any]) -> str:
    shown = []
    for k, v in params.items():
        short = k.rsplit(".", 1)[-1]
        shown.append(f"{short}={v:.3g}" if isinstance(v, float) else f"{short}={v}")
    return f"{trial_id} " + " ".join(shown)


def trials_label(base: Config, param_space: dict[str, Any]) -> bool:
    """Whether any trial may pseudo-label (L_CL or L_CR on), so that Train trials reserve labellers:
    the base config's switches, an ablation cell's, or a searched switch."""
    cells = param_space.get(CELL_KEY, {})
    cells = cells.get("grid_search", []) if isinstance(cells, dict) else [cells]
    return (base.train.use_cl or base.train.use_cr or "train.use_cl" in param_space or "train.use_cr" in param_space
            or any(ABLATION_CELLS[c]["use_cl"] or ABLATION_CELLS[c]["use_cr"] for c in cells))


def check_trials(space: Space, base: Config, *, split_varies: bool = False,
                 warned: list[str] | None = None, address: str | None = None, storage: str | None = None,
                 labelling: bool = True) -> DataSource:
    """The checks before Ray starts that a trial would otherwise fail on, one line each: the base
    config's dataset (prepared and split; also warms the cache for the trials) and, for Train trials
    (``resources.workers >= 1``), ``ray_train.check_run`` on it (workers against labelled images).
    ``split_varies``: trials change data.* (a labelled-fraction sweep), so the base's split says
    nothing about theirs; only the dataset is checked. Returns the base's ``DataSource``.

    Then the resources (``cssl_ray.distributed.preflight``): in-process trials hold no labellers; a Train trial's
    workers get at most one GPU each, and a fraction only alone; with a remote ``address`` the
    experiment folder (``storage``) and the prepared dataset are on shared storage; without one, a
    trial (its labellers when ``labelling``) fits this machine.

    ``warned``: Python warnings the checks raise (e.g. duplicate images dropped from the split) are
    printed as ``warning: <text>`` and appended, so that the experiment does not show them again
    when every trial raises them (``run_experiment(warned=...)``)."""
    check_trial_resources(space.resources)
    if warned is None:
        source = _check_trials(space, base, split_varies)
    else:
        with warnings.catch_warnings(record=True) as caught:
            source = _check_trials(space, base, split_varies)
        for w in caught:
            text = warning_text(w.message, w.category)
            if text not in warned:
                warned.append(text)
                say(f"warning: {text}")
    check_shared_paths(address, [("--storage-path", storage), *dataset_paths(base.data, source.store)])
    if address is None:
        check_fits_here(trial_demand(space.resources, labelling), "one trial",
                        "lower resources.* in the space (or --workers / --gpus-per-labeller)")
    return source


def check_trial_resources(r: Resources) -> None:
    """The space's ``resources:`` that no trial can honour, one line each (before the dataset)."""
    if r.workers == 0 and (r.labellers != 1 or r.gpus_per_labeller):
        raise ConfigError(f"resources.labellers: {r.labellers} x {r.gpus_per_labeller:g} GPU with resources.workers 0: "
                          "an in-process trial labels in its own process and its placement group has no labeller "
                          "bundles; drop resources.labellers / gpus_per_labeller (--labellers / --gpus-per-labeller), "
                          "or set resources.workers >= 1")
    if r.workers >= 1:
        check_worker_gpus(r.workers, r.gpus_per_worker, workers_key="resources.workers",
                          gpus_key="resources.gpus_per_worker")


def _check_trials(space: Space, base: Config, split_varies: bool) -> DataSource:
    r = space.resources
    if r.workers == 0 or split_varies:
        from cssl_ray.data.bundle import open_source
        return open_source(base.data)
    from cssl_ray.distributed.ray_train import check_run
    return check_run(base, workers=r.workers, gpus_per_worker=r.gpus_per_worker, cpus_per_worker=r.cpus_per_worker,
                     labellers=r.labellers, gpus_per_labeller=r.gpus_per_labeller)


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
    from cssl_ray.tracking.store import Tracker, git_commit, ui_address, ui_command

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
                             {"cssl.kind": child_kind, "cssl.space": space.name, "cssl.git_commit": tags["cssl.git_commit"]},
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
    from cssl_ray.tracking.store import KEY_TAG, find_runs

    runs = find_runs(uri, experiment, parent_id=parent_id, tags={KEY_TAG: best.trial_id})
    model_uri = runs[0]["tags"].get(MODEL_URI_TAG) if runs else None
    if model_uri is None:
        return None
    version = register_model(uri, model_uri, name, runs[0]["run_id"])
    return f"models:/{name}/{version}"


def log_parent_files(uri: str, experiment: str, parent_id: str, paths: list[Path], artifact_path: str | None = None) -> None:
    """Attach files (the report, the best config) to an experiment's parent run."""
    from cssl_ray.tracking.store import Tracker
    tracker = Tracker(uri, experiment)
    for path in paths:
        tracker.log_artifact(parent_id, path, artifact_path)


class Interrupted(Exception):
    """The experiment stopped early (Ctrl-C); its state is saved and ``resume=True`` continues it."""


def unfinished(trials: list) -> list:
    """Tune trials that neither ended nor failed."""
    return [t for t in trials if t.status not in ENDED]


def best_outcome(outcomes: list[TrialOutcome], metric: str, mode: str) -> TrialOutcome | None:
    """The finished trial (test metrics present) with the best value of ``metric`` over its results;
    ties (a flat metric, such as nuclei's micronucleus Dice at 0) go to the best val_dice_mean, as
    within a run (``TrainConfig.selection_order``)."""
    def value(o: TrialOutcome, key: str, how: str) -> float:
        v = float(o.metric_analysis.get(key, {}).get(how, math.nan))
        return -math.inf if math.isnan(v) else (v if how == "max" else -v)

    finished = [o for o in outcomes if o.test]
    return max(finished, key=lambda o: (value(o, metric, mode), value(o, "val_dice_mean", "max"))) \
        if finished else None


def fail(prog: str, message: str) -> int:
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 2
