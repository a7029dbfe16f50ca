"""One trial of a Tune experiment (``cssl_ray.experiments.trials``): the function trainable and the
config it trains.

    trial    run_trial: one CSSL run from the space's base config + the trial's parameters;
             workers == 0 trains in the trial's own process (cssl_ray.run.local), workers >= 1 builds
             and fits a TorchTrainer inside the trial (Ray Train V2's Train-inside-Tune pattern)
             whose rank-0 reports reach Tune through TuneReportCallback. Either way Tune sees one
             result per validation (every stage-A epoch as round 0, then every round), with
             ``round`` (ASHA's time attribute) and ``step``; the base config carries the space's
             metric as ``train.select_metric`` (``Space.select``), so each trial's best weights
             and test metrics follow the criterion that ranks it.

A trial's parameters are dotted config keys and/or ``cell`` (``CELL_KEY``: an ablation cell's switches).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cssl_ray.config import Config, from_dict, merge
from cssl_ray.distributed.placement import Resources, stream_resources
from cssl_ray.experiments.ablation_cells import ABLATION_CELLS, CELL_BASELINES, CELL_DATA
from cssl_ray.experiments.space_config import unflatten
from cssl_ray.tracking.progress import record_warnings

CELL_KEY = "cell"  # a trial parameter naming an ablation cell (sets the three switches)
TRIAL_WARNINGS = "warnings.json"  # a trial's Python warnings (cssl_ray.tracking.progress)


@dataclass
class TrialSpec:
    """What every trial of an experiment shares (sent once through the object store)."""

    base: dict[str, Any]  # to_dict(the base Config)
    runs_root: str  # absolute; trial folders go below it
    resources: Resources
    threads: int = 0  # torch threads per in-process trial (0 = the config's train.num_threads)


def trial_config(base: dict[str, Any], params: dict[str, Any]) -> Config:
    """The base config with a trial's parameters applied (dotted keys; ``cell`` = ablation switches)."""
    extra = {k: v for k, v in params.items() if k != CELL_KEY}
    cfg_dict = merge(base, unflatten(extra))
    if CELL_KEY in params:
        cell = params[CELL_KEY]
        cfg_dict = merge(cfg_dict, {"train": dict(ABLATION_CELLS[cell]), "data": dict(CELL_DATA.get(cell, {})),
                                    "baselines": dict(CELL_BASELINES.get(cell, {}))})
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


def trials_label(base: Config, param_space: dict[str, Any]) -> bool:
    """Whether any trial may pseudo-label with labellers (L_CL or L_CR on under the paper's protocol),
    so that Train trials reserve them: the base config's switches, an ablation cell's, or a searched
    switch; never when every trial runs the joint protocol (its ranks label their own shards)."""
    protocols = param_space.get("train.protocol", base.train.protocol)
    protocols = protocols.get("grid_search", []) if isinstance(protocols, dict) else [protocols]
    if "paper" not in protocols:
        return False
    cells = param_space.get(CELL_KEY, {})
    cells = cells.get("grid_search", []) if isinstance(cells, dict) else [cells]
    return (base.train.use_cl or base.train.use_cr or "train.use_cl" in param_space or "train.use_cr" in param_space
            or any(ABLATION_CELLS[c]["use_cl"] or ABLATION_CELLS[c]["use_cr"] for c in cells))
