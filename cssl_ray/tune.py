"""Search CSSL's hyperparameters with Ray Tune; every trial recorded in MLflow.

    python -m cssl_ray.tune --space tune_spaces/monuseg.yaml [--num-samples N] [--address auto]
                            [--storage-path DIR] [--tracking-uri URI] [--resume]
    python -m cssl_ray.tune --space tune_spaces/smoke.yaml          # a minute on a CPU

Each trial is one CSSL run (``cssl_ray.experiment``): in-process when the space says
``resources.workers: 0``, else a distributed Ray Train run inside the trial. Trials report after
every validation; ASHA (the default scheduler) compares them by the space's metric at rounds
``grace_period * reduction_factor**k`` and stops the poor ones. At the end the best finished trial
(by its best value of the metric; never by test data) is printed with its test metrics, and its
resolved config is written as a YAML that ``python -m cssl_ray.train --config`` accepts, and that
``python -m cssl_ray.ablate`` picks up as its fixed hyperparameters.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from cssl_ray.config import ConfigError, dump_config, to_dict
from cssl_ray.experiment import best_outcome, fail, run_experiment, trial_config
from cssl_ray.search_space import Space, load_space

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
    p.add_argument("--workers", type=int, help="override resources.workers (0 = each trial trains in-process)")
    return p


def with_workers(space: Space, workers: int | None) -> Space:
    """The space with ``--workers`` applied (None = as the space says)."""
    if workers is None:
        return space
    if workers < 0:
        raise ConfigError(f"--workers: {workers} is out of range; allowed: >= 0 (0 = in-process trials)")
    return dataclasses.replace(space, resources=dataclasses.replace(space.resources, workers=workers))


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    prog = "cssl_ray.tune"
    try:
        space = with_workers(load_space(args.space), args.workers)
        if args.num_samples is not None:
            if args.num_samples < 1:
                raise ConfigError(f"--num-samples: {args.num_samples} is out of range; allowed: >= 1")
            space = dataclasses.replace(space, num_samples=args.num_samples)
        base = space.base_config()
        from cssl_ray.data.bundle import load_bundle
        load_bundle(base.data)  # a missing dataset is one line here, before Ray starts; warms the cache
        from cssl_ray.tracking import tracking_uri
        uri = tracking_uri(args.tracking_uri)
        outcomes, parent = run_experiment(
            space, param_space=space.param_space(), kind="tune", tune_name=tune_folder(space), base=base,
            uri=uri, storage=Path(args.storage_path), scheduler=make_scheduler(space, base.train.max_rounds),
            num_samples=space.num_samples, address=args.address, resume=args.resume, threads=args.threads)
    except (ConfigError, FileNotFoundError) as e:
        return fail(prog, str(e))
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
    shown = {k: round(v, 4) for k, v in best.test.items() if k.startswith(("dice", "iou", "auprc"))}
    print(f"best trial {best.trial_id} ({space.metric} {space.mode} "
          f"{best.metric_analysis.get(space.metric, {}).get(space.mode, float('nan')):.4f}):")
    print("  params: " + json.dumps(best.params))
    print("  test:   " + json.dumps(shown))
    print(f"  config: {path}   (python -m cssl_ray.train --config {path})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
