"""One Ray Tune experiment of CSSL runs, recorded in MLflow: what ``tune`` and ``ablate`` share.

    driver   run_experiment: Tuner(trial, param_space) -> trials run concurrently as resources
             allow -> the MLflow callback (driver side, the only writer) records every trial
    trial    run_trial: one CSSL run from the space's base config + the trial's parameters;
             workers == 0 trains in the trial's own process (cssl_ray.local), workers >= 1 builds
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
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cssl_ray.config import Config, ConfigError, from_dict, merge, to_dict
from cssl_ray.placement import concurrent_trials, stream_resources, trial_bundles, trial_demand
from cssl_ray.search_space import ABLATION_CELLS, CELL_DATA, Resources, Space, cell_of, unflatten

if TYPE_CHECKING:  # torch: the CLIs import this module before their arguments are checked
    from cssl_ray.data.bundle import DataSource

CELL_KEY = "cell"  # a trial parameter naming an ablation cell (sets the three switches)
SESSION_FILE = "cssl_session.json"
# Tune writes its experiment state at most this often; a killed driver loses at most that much.
os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")


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
    test evaluation off a trial that finished every round.
    """
    from ray import tune

    trial_id = tune.get_context().get_trial_id()
    out_dir = Path(spec.runs_root) / trial_id
    cfg = trial_config(spec.base, params)
    train = dataclasses.replace(cfg.train, out_dir=str(out_dir), progress=False,
                                num_threads=spec.threads or cfg.train.num_threads)
    cfg = dataclasses.replace(cfg, train=train)
    last_round = cfg.train.max_rounds
    held: list[dict[str, Any]] = []

    def report(record: dict[str, Any]) -> None:
        if is_last_round(record, last_round):
            held.append(record)
        else:
            tune.report(tune_metrics(record, 0))

    if spec.resources.workers == 0:
        from cssl_ray.local import run_local
        # resume: a restarted trial continues its rounds; trials whose stage A is identical (cells of
        # one seed, trials that search only what comes after it, a search and the ablation after it)
        # train it once per storage path: the cache key holds everything stage A depends on
        run_local(cfg, resume=True, log=report, stage_a_cache=Path(spec.runs_root).parent.parent / "stage_a")
    else:
        import ray

        from cssl_ray.ray_train import run_ray
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
                  base_tags: dict[str, str], metric: str, mode: str, log: Callable[[str], None] | None = None):
    """The driver-side Tune callback that records trials in MLflow (built here: ray.tune is lazy)."""
    from ray import tune

    log = log or say  # a module-level function: Tune pickles the callback (by value, with its closure)

    class MLflowRecorder(tune.Callback):
        """Every trial -> one child run: params, metrics per result, test metrics, files, status.

        Runs in the driver (Tune's controller), so only the driver writes to MLflow. A trial that
        errors ends FAILED; one ASHA stopped ends FINISHED with tag cssl.early_stopped=true.
        Also prints one line per trial start and end (Tune's own tables are off: verbose=0).
        """

        def __init__(self) -> None:
            self.runs: dict[str, str] = {}
            self._tracker = None

        @property
        def tracker(self):
            if self._tracker is None:
                from cssl_ray.tracking import Tracker
                self._tracker = Tracker(uri, experiment)
            return self._tracker

        def __getstate__(self) -> dict[str, Any]:  # Tune pickles callbacks with its state
            return {"runs": self.runs, "_tracker": None}

        def on_trial_start(self, iteration, trials, trial, **info) -> None:
            self._open(trial)
            log(f"[{_done(trials)}/{len(trials)}] started  {trial_name(trial.trial_id, trial.config)}")

        def _open(self, trial) -> str:
            if trial.trial_id in self.runs:
                return self.runs[trial.trial_id]
            from cssl_ray.tracking import flatten_config
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

        def on_trial_complete(self, iteration, trials, trial, **info) -> None:
            self._close(trials, trial, "FINISHED")

        def on_trial_error(self, iteration, trials, trial, **info) -> None:
            self._close(trials, trial, "FAILED")

        def _close(self, trials, trial, status: str) -> None:
            run_id = self._open(trial)
            out_dir = runs_root / trial.trial_id
            result = read_result(out_dir)
            step = int((trial.last_result or {}).get("step", 0))
            if result:
                self.tracker.log_metrics(run_id, {f"test_{k}": v for k, v in result["test"].items()}, step=step)
                stage_a = {f"stage_a_{k}": v for k, v in result.get("stage_a", {}).items()}
                self.tracker.log_metrics(run_id, {"best_round": float(result.get("best_round", 0)), **stage_a},
                                         step=step)
                if result.get("warnings"):
                    self.tracker.set_tags(run_id, {"cssl.warning": " | ".join(result["warnings"])[:5000]})
            early = status == "FINISHED" and not result
            self.tracker.set_tags(run_id, {"cssl.early_stopped": str(early).lower(), "cssl.out_dir": str(out_dir)})
            if status == "FAILED" and trial.error_file:
                self.tracker.set_tags(run_id, {"cssl.error": _first_error_line(trial)})
            for name in ("config.yaml", "split.json", "split_names.json", "result.json", "best.pt"):
                if (out_dir / name).exists():
                    self.tracker.log_artifact(run_id, out_dir / name)
            if (out_dir / "figures").is_dir():
                self.tracker.log_artifacts(run_id, out_dir / "figures", "figures")
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
            log(f"[{_done(trials)}/{len(trials)}] {trial.trial_id} {what}{shown}{test}")

    return MLflowRecorder()


_TUNE_KEYS = {"training_iteration", "time_total_s", "episodes_total", "timesteps_total", "node_ip", "hostname",
              "pid", "time_this_iter_s", "timestamp", "date", "time_since_restore", "timesteps_since_restore",
              "iterations_since_restore", "config", "checkpoint_dir_name", "done", "trial_id", "experiment_tag",
              "should_checkpoint", "checkpoint_path"}


def say(line: str) -> None:
    print(line, flush=True)


def _done(trials) -> int:
    return sum(t.status in ("TERMINATED", "ERROR") for t in trials)


def _first_error_line(trial) -> str:
    try:
        text = Path(trial.error_file).read_text().strip().splitlines()
        return (text[-1] if text else "unknown error")[:500]
    except OSError:
        return "unknown error"


def read_result(out_dir: Path) -> dict[str, Any]:
    """A finished run's result.json ({} if the run did not finish)."""
    path = out_dir / "result.json"
    if not path.exists():
        return {}
    return json.loads(path.read_text())


def run_tags(cfg: Config, cell: str | None = None, nominal: Config | None = None) -> dict[str, str]:
    """Tags of a trial: dataset, the experiment's labelled share (``nominal``'s, so a reference cell
    such as supervised_all sits in its experiment's table), cell (``cell``, else from the switches)."""
    d, n = cfg.data, (nominal or cfg).data
    return {"cssl.dataset": d.name, "cssl.labelled_fraction": str(n.labelled_fraction),
            "cssl.labelled_count": str(n.labelled_count), "cssl.cell": cell or cell_of(cfg),
            "cssl.seed": str(cfg.train.seed), "cssl.method": _method_tag(cfg)}


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


def check_trials(space: Space, base: Config, *, split_varies: bool = False) -> DataSource:
    """The checks before Ray starts that a trial would otherwise fail on, one line each: the base
    config's dataset (prepared and split; also warms the cache for the trials) and, for Train trials
    (``resources.workers >= 1``), ``ray_train.check_run`` on it (workers against labelled images).
    ``split_varies``: trials change data.* (a labelled-fraction sweep), so the base's split says
    nothing about theirs; only the dataset is checked. Returns the base's ``DataSource``."""
    r = space.resources
    if r.workers == 0 or split_varies:
        from cssl_ray.data.bundle import open_source
        return open_source(base.data)
    from cssl_ray.ray_train import check_run
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
                   uri: str, storage: Path, scheduler: Any = None, num_samples: int = 1,
                   address: str | None = None, resume: bool = False, parent_tags: dict[str, str] | None = None,
                   threads: int = 0, log: Callable[[str], None] | None = None) -> tuple[list[TrialOutcome], str]:
    """Run (or resume) one Tune experiment of CSSL trials; returns every trial's outcome and the parent run id.

    Args:
        space: the loaded search space (resources, metric/mode, max concurrent trials, name).
        param_space: Tune's param_space (dotted config keys and/or ``cell``); constants allowed.
        kind: "tune" or "ablate" (the parent run's cssl.kind; children get "trial" / "ablation").
        tune_name: the Tune experiment folder under ``storage``.
        base: the config every trial starts from.
        uri: MLflow tracking URI (absolute).
    """
    import ray
    from ray import tune

    from cssl_ray.ray_init import init_ray
    from cssl_ray.tracking import Tracker, git_commit, ui_command

    storage = storage.resolve()
    folder = experiment_folder(storage, tune_name, resume)
    # Ray first: the cap on concurrent trials needs the cluster's resources (cssl_ray.placement says
    # why it prevents deadlock), and a trial that never fits is one line before anything is written.
    labelling = trials_label(base, param_space)
    demand = trial_demand(space.resources, labelling)
    started = init_ray(address, space.max_concurrent_trials * demand.cpus)
    try:
        concurrent = concurrent_trials(space.max_concurrent_trials, demand, ray.cluster_resources(),
                                       can_grow=address is not None, log=log or say)
    except ConfigError:
        if started:
            ray.shutdown()
        raise
    runs_root = folder / "runs"
    session = session_id(folder, resume)
    tracker = Tracker(uri, space.name)
    tags = {"cssl.kind": kind, "cssl.space": str(space.path), "cssl.dataset": space.dataset,
            "cssl.git_commit": git_commit(), **(parent_tags or {})}
    parent_id = tracker.start_parent(f"{kind}:{tune_name}", tags, session=session)
    if resume:  # runs a killed driver left RUNNING: interrupted; restarted trials reopen theirs
        tracker.close_open_runs("KILLED", parent_id=parent_id)
        tracker.start_parent(f"{kind}:{tune_name}", tags, session=session)

    child_kind = "trial" if kind == "tune" else "ablation"
    callback = make_callback(uri, space.name, parent_id, to_dict(base), runs_root,
                             {"cssl.kind": child_kind, "cssl.space": space.name, "cssl.git_commit": tags["cssl.git_commit"]},
                             space.metric, space.mode, log)
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
                                            scheduler=scheduler, max_concurrent_trials=concurrent),
                run_config=tune.RunConfig(name=tune_name, storage_path=str(storage), callbacks=[callback],
                                          verbose=0, failure_config=tune.FailureConfig(max_failures=0)))
        grid = tuner.fit()
        interrupted = False
    finally:
        if not interrupted:
            tracker.end(parent_id, "FINISHED")
            tracker.close_open_runs("FAILED", parent_id=parent_id)  # a child the callback missed
        else:  # Ctrl-C or an error in the driver: nothing stays RUNNING; --resume continues
            tracker.close_open_runs("KILLED", parent_id=parent_id)
        if started:
            ray.shutdown()
    outcomes = []
    for trial in grid._experiment_analysis.trials:  # Trial objects: status, config, metric_analysis
        out_dir = runs_root / trial.trial_id
        result = read_result(out_dir)
        outcomes.append(TrialOutcome(
            trial_id=trial.trial_id, params=dict(trial.config), status=trial.status, out_dir=out_dir,
            test=result.get("test", {}), best_val=result.get("best_val", {}),
            metric_analysis=dict(trial.metric_analysis or {}),
            early_stopped=trial.status == "TERMINATED" and not result))
    (log or say)(f"MLflow: experiment {space.name!r}, parent run {parent_id}; open it with:\n  {ui_command(uri)}")
    return outcomes, parent_id


def best_outcome(outcomes: list[TrialOutcome], metric: str, mode: str) -> TrialOutcome | None:
    """The finished trial (test metrics present) with the best value of ``metric`` over its results."""
    def score(o: TrialOutcome) -> float:
        v = float(o.metric_analysis.get(metric, {}).get(mode, math.nan))
        return -math.inf if math.isnan(v) else (v if mode == "max" else -v)
    finished = [o for o in outcomes if o.test]
    return max(finished, key=score) if finished else None


def fail(prog: str, message: str) -> int:
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 2
