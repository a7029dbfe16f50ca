"""Rerun the paper's ablations over seeds at fixed hyperparameters; every cell recorded in MLflow.

    python -m cssl_ray.ablate --space tune_spaces/monuseg.yaml [--seeds 3] [--config best.yaml]
                              [--cells supervised cssl ...] [--fractions 0.05 0.1 0.25]
    python -m cssl_ray.ablate --space tune_spaces/smoke.yaml --seeds 2    # a minute on a CPU
    python -m cssl_ray.ablate --space ... --dry-run                       # the checks only; starts nothing

Table 5 grid (default): the cells of ``ablation_cells.ABLATION_CELLS`` — use_cl x use_cr x
use_hard_negatives, where hard negatives only exist with L_CL, so six cells: supervised (all off,
the fully supervised baseline with exactly the same supervised steps), CL, CL + hard negatives,
CR, CL + CR, and CSSL (all on) — each over ``--seeds`` seeds (train.seed: the model's
initialisation and every sampled batch; the labelled/unlabelled split stays the space's, so the
t-test of the report is paired by seed). With ``--fractions`` (or the space's
``ablation.label_fractions``) it is the Table 2 style sweep instead: supervised vs CSSL at each
labelled fraction.

Fixed hyperparameters: ``--config`` if given, else the best config a finished
``python -m cssl_ray.tune`` run of this space wrote, else the space's base config. Cells run as
one Ray Tune experiment (no early stopping), as concurrent as the space's resources allow; at the
end the report table (``cssl_ray.experiments.report``) is read back from MLflow and printed. ``--dry-run``
runs the checks made before Ray starts (as ``python -m cssl_ray.tune --dry-run``), prints what
would run and exits. Every run keeps its best weights (its test metrics) by the space's metric and
mode where that is a validation key, whatever the fixed config says; ``--select-metric`` /
``--select-mode`` choose another (``search_space.Space.select``).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from cssl_ray.config import Config, ConfigError, dump_config, load_config
from cssl_ray.distributed.ray_init import set_verbose
from cssl_ray.experiments.ablation_cells import ABLATION_CELLS, PROTOCOLS
from cssl_ray.experiments.search_space import Space, load_space
from cssl_ray.experiments.trainable import CELL_KEY, trials_label
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
from cssl_ray.experiments.tune import (
    DEFAULT_STORAGE,
    add_resource_flags,
    add_selection_flags,
    add_verbose_flag,
    announce_model,
    best_config_path,
    data_text,
    trial_resources_text,
    with_resources,
)

SWEEP_CELLS = ["supervised", "cssl"]


def ablation_grid(space: Space, seeds: int, cells: list[str] | None, fractions: list[float] | None,
                  protocols: list[str] | None = None) -> dict[str, Any]:
    """Tune param_space: grid over cells x seeds (x labelled fractions) (x train.protocol values)."""
    from ray import tune

    fractions = fractions if fractions is not None else space.ablation.label_fractions
    cells = cells or (SWEEP_CELLS if fractions else space.ablation.cells)
    protocols = protocols if protocols is not None else space.ablation.protocols
    for protocol in protocols:
        if protocol not in PROTOCOLS:
            raise ConfigError(f"--protocols: {protocol!r} is not a protocol; choose from {', '.join(PROTOCOLS)}")
    for c in cells:  # every cell runs in-process (resources.workers 0) or as a Ray Train trial, both protocols
        if c not in ABLATION_CELLS:
            raise ConfigError(f"--cells: {c!r} is not a cell; choose from {', '.join(ABLATION_CELLS)}")
    if seeds < 1:
        raise ConfigError(f"--seeds: {seeds} is out of range; allowed: >= 1")
    grid: dict[str, Any] = {CELL_KEY: tune.grid_search(list(cells)), "train.seed": tune.grid_search(list(range(seeds)))}
    if fractions:
        for f in fractions:
            if not 0.0 < f <= 1.0:
                raise ConfigError(f"--fractions: {f} is out of range; allowed: 0 < fraction <= 1")
        grid["data.labelled_fraction"] = tune.grid_search(list(fractions))
        grid["data.labelled_count"] = 0  # a count would override the fraction
    if protocols:
        grid["train.protocol"] = tune.grid_search(list(dict.fromkeys(protocols)))
    return grid


def fixed_config(space: Space, config: str | None, storage: str, log=print) -> Config:
    """--config, else the tuned best config of this space, else the space's base."""
    if config:
        log(f"fixed hyperparameters: {config}")
        return load_config(config)
    best = best_config_path(space, storage)
    if best.exists():
        log(f"fixed hyperparameters: the tuned best config {best}")
        return load_config(best)
    log(f"fixed hyperparameters: the base config of {space.path}")
    return space.base_config()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cssl_ray.ablate", description=__doc__.split("\n\n")[0])
    p.add_argument("--space", required=True, help="a search space YAML (tune_spaces/*.yaml)")
    p.add_argument("--seeds", type=int, help="seeds per cell (default: the space's ablation.seeds)")
    p.add_argument("--cells", nargs="+", help=f"cells to run (default the space's ablation.cells; any of "
                                              f"{' '.join(ABLATION_CELLS)})")
    p.add_argument("--fractions", type=float, nargs="+", help="labelled fractions: a Table 2 style sweep")
    p.add_argument("--protocols", nargs="+", help="train.protocol values, each cell under each (paper joint; "
                                                  "default the space's ablation.protocols, else the config's)")
    p.add_argument("--config", help="a config YAML with the fixed hyperparameters")
    p.add_argument("--address", help="an existing Ray cluster, e.g. auto; default: start Ray here")
    p.add_argument("--storage-path", default=DEFAULT_STORAGE, help=f"experiment folder root (default {DEFAULT_STORAGE})")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else ./mlflow.db)")
    p.add_argument("--name", help="experiment folder name (default <space>-ablate[-fractions])")
    p.add_argument("--resume", action="store_true", help="continue an interrupted ablation")
    p.add_argument("--threads", type=int, default=0, help="torch threads per in-process trial (0 = the config's)")
    p.add_argument("--register-name", help="registered model name of the best run (default <space>-ablate)")
    add_resource_flags(p, "run")
    add_selection_flags(p)
    p.add_argument("--dry-run", action="store_true",
                   help="run every check made before Ray starts, print what would run, start nothing")
    add_verbose_flag(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    set_verbose(args.verbose)
    prog = "cssl_ray.ablate"
    try:
        space = with_resources(load_space(args.space), args)
        source: list[str] = []  # where the fixed hyperparameters come from (printed now, or in the dry-run line)
        base = fixed_config(space, args.config, args.storage_path, log=source.append if args.dry_run else print)
        base = space.select(base, args.select_metric, args.select_mode)  # every cell: the space's selection
        seeds = args.seeds if args.seeds is not None else space.ablation.seeds
        grid = ablation_grid(space, seeds, args.cells, args.fractions, args.protocols)  # imports Ray: after the one-line checks
        sweep = "data.labelled_fraction" in grid
        warned: list[str] = []  # warnings of the checks: shown now, not again by every trial
        data = check_trials(space, base, split_varies=sweep, warned=warned, address=args.address,  # before Ray
                            storage=args.storage_path, labelling=trials_label(base, grid))  # starts, one line each
        from cssl_ray.tracking.uri import tracking_uri
        uri = tracking_uri(args.tracking_uri)
        name = args.name or f"{space.name}-ablate" + ("-fractions" if sweep else "")
        if args.dry_run:
            folder = experiment_folder(Path(args.storage_path), name, args.resume)
            shape = f"{', '.join(grid[CELL_KEY]['grid_search'])} x {seeds} seed(s)"
            if sweep:
                shape += f" x {len(grid['data.labelled_fraction']['grid_search'])} fraction(s)"
            if "train.protocol" in grid:
                shape += f" x protocol {' / '.join(grid['train.protocol']['grid_search'])}"
            print(f"dry run: ablate {space.name}: {grid_size(grid)} run(s) ({'fractions' if sweep else 'table5'} "
                  f"grid: {shape}), up to {space.max_concurrent_trials} at a time, "
                  f"{trial_resources_text(space, trials_label(base, grid))}; "
                  f"{source[0]}; {data_text(base, data)}; Ray at {args.address or 'a local instance started here'}, "
                  f"experiment in {folder}{' (resumed)' if args.resume else ''}, MLflow at {uri}; nothing started")
            return 0
        # no search_alg, whatever the space's search_algorithm: Tune's variant generator runs every
        # cell x seed of the grid once (a sampler such as Optuna's cannot take grids)
        outcomes, parent = run_experiment(
            space, param_space=grid, kind="ablate", tune_name=name, base=base, uri=uri,
            storage=Path(args.storage_path), scheduler=None, num_samples=1, address=args.address,
            resume=args.resume, threads=args.threads, parent_tags={"cssl.grid": "fractions" if sweep else "table5"},
            warned=warned)
    except (ConfigError, FileNotFoundError) as e:
        return fail(prog, str(e))
    except Interrupted as e:  # Ctrl-C: Tune saved the experiment
        print(f"{prog}: {e}", file=sys.stderr)
        return 130
    failed = [o for o in outcomes if o.status == "ERROR"]
    print(f"\n{len(outcomes)} runs, {len(failed)} failed")
    if not outcomes:
        return 1
    folder = Path(args.storage_path) / name
    dump_config(base, folder / "fixed_config.yaml")  # the parent run's record of the fixed hyperparameters
    log_parent_files(uri, space.name, parent, [folder / "fixed_config.yaml"])
    from cssl_ray.experiments import report
    code = report.main(["--experiment", space.name, "--parent", parent, "--tracking-uri", uri,
                        "--out", str(folder / "report")])  # also attached to the parent run
    best = best_outcome(outcomes, space.metric, space.mode)
    if best is not None:
        print(f"best run by validation {space.metric} ({space.mode}): {best.trial_id} {json.dumps(best.params)}")
        announce_model(register_best(uri, space.name, parent, best, args.register_name or f"{space.name}-ablate"))
    return code


if __name__ == "__main__":
    sys.exit(main())
