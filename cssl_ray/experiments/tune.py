"""Search CSSL's hyperparameters with Ray Tune; every trial recorded in MLflow.

    python -m cssl_ray.tune --space tune_spaces/monuseg.yaml [--num-samples N] [--address auto]
                            [--storage-path DIR] [--tracking-uri URI] [--resume]
    python -m cssl_ray.tune --space tune_spaces/smoke.yaml          # a minute on a CPU
    python -m cssl_ray.tune --space ... --dry-run                   # the checks only; starts nothing

Each trial is one CSSL run (``cssl_ray.experiments.trainable``): in-process when the space says
``resources.workers: 0``, else a distributed Ray Train run inside the trial. The space's
``search_algorithm`` picks the trials: ``random`` (Tune's variant generator, the default) or
``optuna`` (Optuna's TPE sampler, seeded by the space's ``seed``; ``make_searcher``). Trials report after
every validation; ASHA (the default scheduler) compares them by the space's metric at rounds
``grace_period * reduction_factor**k`` and stops the poor ones. Each trial keeps its best weights
(and takes its test metrics from them) by the same metric and mode where it is a validation key
(``train.select_metric``; ``--select-metric`` / ``--select-mode`` choose another). At the end the best finished trial
(by its best value of the metric; never by test data) is printed with its test metrics, and its
resolved config is written as a YAML that ``python -m cssl_ray.train --config`` accepts, and that
``python -m cssl_ray.ablate`` picks up as its fixed hyperparameters.

``--dry-run`` runs every check made before Ray starts (the space, the base config, its dataset
loaded and split, Train trials' workers against labelled images, the scheduler, the experiment
folder), prints what would run and exits: no Ray, no MLflow run, no folder written.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cssl_ray.config import Config, ConfigError, dump_config, to_dict
from cssl_ray.distributed.placement import check_labeller_flags
from cssl_ray.distributed.ray_init import set_verbose
from cssl_ray.experiments.search_space import Space, load_space
from cssl_ray.experiments.trainable import trial_config, trials_label
from cssl_ray.experiments.trial_checks import check_trials
from cssl_ray.experiments.trials import (
    Interrupted,
    best_outcome,
    experiment_folder,
    fail,
    grid_size,
    log_parent_files,
    register_best,
    run_experiment,
)
from cssl_ray.tracking.run_record import selected_value

if TYPE_CHECKING:  # torch: loaded only once the arguments are valid
    from cssl_ray.data.bundle import DataSource

DEFAULT_STORAGE = "runs/tune"
BEST_CONFIG = "best_config.yaml"


def tune_folder(space: Space) -> str:
    return f"{space.name}-tune"


def best_config_path(space: Space, storage: str | Path) -> Path:
    return Path(storage).resolve() / tune_folder(space) / BEST_CONFIG


def make_scheduler(space: Space, max_rounds: int) -> Any:
    """ASHA over rounds (time attribute ``round``; stage A reports round 0), or None for FIFO.

    ASHA stops a trial whose report reaches max_t = the last round; the trial reports its last
    round only after it has written its test metrics (``experiment.run_trial``), so that stop is
    harmless.
    """
    if space.scheduler.name == "fifo":
        return None
    if space.scheduler.grace_period > max_rounds:
        raise ConfigError(f"{space.path}: scheduler.grace_period: {space.scheduler.grace_period} rounds is more than "
                          f"train.max_rounds ({max_rounds}); allowed: 1..{max(max_rounds, 1)} (or scheduler name fifo)")
    from ray.tune.schedulers import ASHAScheduler
    return ASHAScheduler(time_attr="round", max_t=max(max_rounds, 1), grace_period=space.scheduler.grace_period,
                         reduction_factor=space.scheduler.reduction_factor)


def make_searcher(space: Space) -> Any:
    """The space's search algorithm for ``TuneConfig(search_alg=...)``: None (Tune's random variant
    generator) or Ray's OptunaSearch with Optuna's TPE sampler seeded by ``space.seed``.

    OptunaSearch gets no space of its own: Tune hands it the space's ``param_space()`` and it maps each
    domain to the Optuna distribution with the same bounds (``search_space``'s docstring; checked in
    tests/test_search_space.py), so suggestions stay inside what ``load_space`` checked. The scheduler
    still stops trials, and ``max_concurrent_trials`` still caps them (Tune wraps the searcher in a
    ConcurrencyLimiter; Optuna's TPE uses the constant liar, so concurrent trials differ). On
    ``--resume`` Tune restores the searcher from the experiment folder (Optuna's study: every told
    trial and the sampler's random state), so the search continues where it stopped instead of
    proposing the first trials again.
    """
    if space.search_algorithm == "random":
        return None
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line per trial is the MLflow callback's
    return OptunaSearch(metric=space.metric, mode=space.mode, sampler=optuna.samplers.TPESampler(seed=space.seed))


def search_text(space: Space) -> str:
    """The search algorithm, for a dry run: ``random search`` or ``Optuna TPE search (seed 0)``."""
    return "random search" if space.search_algorithm == "random" else f"Optuna TPE search (seed {space.seed})"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cssl_ray.tune", description=__doc__.split("\n\n")[0])
    p.add_argument("--space", required=True, help="a search space YAML (tune_spaces/*.yaml)")
    p.add_argument("--num-samples", type=int, help="override the space's num_samples")
    p.add_argument("--address", help="an existing Ray cluster, e.g. auto; default: start Ray here")
    p.add_argument("--storage-path", default=DEFAULT_STORAGE,
                   help=f"experiment folder root (default {DEFAULT_STORAGE}); shared storage on a multi-node cluster")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else ./mlflow.db)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted experiment (finished trials are kept)")
    p.add_argument("--threads", type=int, default=0, help="torch threads per in-process trial (0 = the config's)")
    p.add_argument("--register-name", help="registered model name of the best trial (default: the space's name)")
    add_resource_flags(p, "trial")
    add_selection_flags(p)
    p.add_argument("--dry-run", action="store_true",
                   help="run every check made before Ray starts, print what would run, start nothing")
    add_verbose_flag(p)
    return p


def trial_resources_text(space: Space, labelling: bool = True) -> str:
    """What one trial holds, for a dry run: ``each trial 1 Train worker(s) x 0.5 GPU, 4 CPU each, 1
    pseudo-labeller(s) x 0.5 GPU (in all 5.51 CPU and 1 GPU)``; ``labelling``: trials use L_CL or L_CR
    (``experiment.trials_label``), so they hold labellers."""
    from cssl_ray.distributed.placement import trial_demand

    r = space.resources
    gpus = f" x {r.gpus_per_worker:g} GPU" if r.gpus_per_worker else ""
    if r.workers == 0:
        return f"each trial in-process on {r.cpus_per_worker:g} CPU{gpus}"
    labellers = ""
    if labelling:
        on = f"x {r.gpus_per_labeller:g} GPU" if r.gpus_per_labeller else "on CPU"
        labellers = f", {r.labellers} pseudo-labeller(s) {on}"
    demand = trial_demand(r, labelling)
    return (f"each trial {r.workers} Train worker(s){gpus}, {r.cpus_per_worker:g} CPU each{labellers} "
            f"(in all {demand.cpus:g} CPU and {sum(demand.gpus):g} GPU)")


def data_text(base: Config, source: DataSource) -> str:
    """The base config and its split, for a dry run: ``config ok (...); data ok (3 labelled, ...)``."""
    return (f"config ok ({base.data.name} {base.data.image_size[0]}x{base.data.image_size[1]}, {base.model.name}); "
            f"data ok ({source.describe()})")


def add_resource_flags(p: argparse.ArgumentParser, unit: str) -> None:
    """``--workers``, ``--labellers``, ``--gpus-per-labeller``: a space's ``resources`` from the command line."""
    p.add_argument("--workers", type=int, help=f"override resources.workers (0 = each {unit} trains in-process)")
    p.add_argument("--labellers", type=int, help=f"override resources.labellers (pseudo-labeller actors per {unit})")
    p.add_argument("--gpus-per-labeller", type=float,
                   help="override resources.gpus_per_labeller (0 = CPU labellers, a fraction up to 1 shares a GPU)")


def add_verbose_flag(p: argparse.ArgumentParser) -> None:
    """``--verbose``: Ray's own output too (``cssl_ray.distributed.ray_init.set_verbose``)."""
    p.add_argument("--verbose", action="store_true",
                   help="show Ray's own output (raylet, core_worker, Ray Train and Ray Data lines, deprecation "
                        "warnings); default: the project's progress lines and results only")


def add_selection_flags(p: argparse.ArgumentParser, default: str = "the space's metric") -> None:
    """``--select-metric``, ``--select-mode``: what each run keeps its best weights (and test metrics)
    by, instead of the space's ``metric:`` / ``mode:`` (``Space.select``) or the config's."""
    p.add_argument("--select-metric", metavar="METRIC",
                   help="validation key each run keeps its best weights by (val_dice_mean, val_iou_mean, val_loss, "
                        f"val_dice/<class>, val_iou/<class>); default: {default}")
    p.add_argument("--select-mode", choices=("max", "min", "auto"),
                   help="better = larger (max) or smaller (min); default: the space's mode (the config's for "
                        "train), or with --select-metric auto (min for val_loss)")


def with_resources(space: Space, args: argparse.Namespace) -> Space:
    """The space with the ``add_resource_flags`` given on the command line applied (None = as it says)."""
    changes: dict[str, Any] = {}
    if args.workers is not None:
        if args.workers < 0:
            raise ConfigError(f"--workers: {args.workers} is out of range; allowed: >= 0 (0 = in-process trials)")
        changes["workers"] = args.workers
    if args.labellers is not None:
        changes["labellers"] = args.labellers
    if args.gpus_per_labeller is not None:
        changes["gpus_per_labeller"] = args.gpus_per_labeller
    if not changes:
        return space
    resources = dataclasses.replace(space.resources, **changes)
    check_labeller_flags(resources.labellers, resources.gpus_per_labeller)
    return dataclasses.replace(space, resources=resources)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    set_verbose(args.verbose)
    prog = "cssl_ray.tune"
    try:
        space = with_resources(load_space(args.space), args)
        if args.num_samples is not None:
            if args.num_samples < 1:
                raise ConfigError(f"--num-samples: {args.num_samples} is out of range; allowed: >= 1")
            if args.resume:  # Tuner.restore keeps the experiment's own count
                raise ConfigError("--num-samples: a resumed experiment keeps the number of trials it started with; "
                                  "drop --num-samples, or start a new experiment (another --storage-path)")
            space = dataclasses.replace(space, num_samples=args.num_samples)
        base = space.select(space.base_config(), args.select_metric, args.select_mode)
        warned: list[str] = []  # warnings of the checks: shown now, not again by every trial
        param_space = space.param_space()
        data = check_trials(space, base, split_varies=any(k.startswith("data.") for k in space.search),
                            warned=warned, address=args.address, storage=args.storage_path,
                            labelling=trials_label(base, param_space))
        from cssl_ray.tracking.uri import tracking_uri
        uri = tracking_uri(args.tracking_uri)
        scheduler = make_scheduler(space, base.train.last_round())
        search_alg = make_searcher(space)  # here, not in run_experiment: the dry run imports optuna too
        if args.dry_run:
            folder = experiment_folder(Path(args.storage_path), tune_folder(space), args.resume)
            print(f"dry run: tune {space.name}: {space.num_samples * grid_size(param_space)} trial(s) over "
                  f"{len(space.search)} searched key(s), {search_text(space)}, {space.scheduler.name.upper()}, "
                  f"up to {space.max_concurrent_trials} at a time, "
                  f"{trial_resources_text(space, trials_label(base, param_space))}; "
                  f"{data_text(base, data)}; "
                  f"Ray at {args.address or 'a local instance started here'}, experiment in {folder}"
                  f"{' (resumed)' if args.resume else ''}, MLflow at {uri}; nothing started")
            return 0
        outcomes, parent = run_experiment(
            space, param_space=param_space, kind="tune", tune_name=tune_folder(space), base=base,
            uri=uri, storage=Path(args.storage_path), scheduler=scheduler, search_alg=search_alg,
            num_samples=space.num_samples, address=args.address, resume=args.resume, threads=args.threads,
            warned=warned)
    except (ConfigError, FileNotFoundError) as e:
        return fail(prog, str(e))
    except Interrupted as e:  # Ctrl-C: Tune saved the experiment
        print(f"{prog}: {e}", file=sys.stderr)
        return 130
    stopped = sum(o.early_stopped for o in outcomes)
    errored = [o for o in outcomes if o.status == "ERROR"]
    print(f"\n{len(outcomes)} trials: {len(outcomes) - stopped - len(errored)} finished, "
          f"{stopped} stopped early by {space.scheduler.name.upper()}, {len(errored)} failed")
    best = best_outcome(outcomes, space.metric, space.mode)
    if best is None:
        print(f"{prog}: no trial finished; nothing to report", file=sys.stderr)
        return 1
    cfg = trial_config(to_dict(base), best.params)
    path = best_config_path(space, args.storage_path)
    dump_config(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, out_dir="runs/best")), path)
    shown = {k: round(v, 4) for k, v in best.test.items()
             if k.startswith(("dice", "iou", "auprc", "hd95_mean", "asd_mean"))}
    print(f"best trial {best.trial_id} ({space.metric} {space.mode} "
          f"{selected_value(best.best_val, best.metric_analysis, space.metric, space.mode):.4f}):")
    print("  params: " + json.dumps(best.params))
    print("  test:   " + json.dumps(shown))
    print(f"  config: {path}   (python -m cssl_ray.train --config {path})")
    log_parent_files(uri, space.name, parent, [path])
    announce_model(register_best(uri, space.name, parent, best, args.register_name or space.name))
    return 0


def announce_model(model_uri: str | None) -> None:
    """Print the registered best model and the command that segments a folder with it."""
    if model_uri is None:
        print("  model:  none registered (the best trial logged no model)")
        return
    print(f"  model:  {model_uri}   (python -m cssl_ray.predict --model {model_uri} --images DIR --out DIR)")


if __name__ == "__main__":
    sys.exit(main())
