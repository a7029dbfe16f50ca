"""The demo: hyperparameter search, then the ablation grid, on real nuclei images, recorded in MLflow.

    python -m cssl_ray.demo                      # tune_spaces/nuclei_demo.yaml: ~15 min on a 2-core CPU
    python -m cssl_ray.demo --smoke              # tune_spaces/smoke.yaml, in-process trials: ~1 min
    python -m cssl_ray.demo --synthetic          # supervised vs CSSL vs all labels on synthetic data

The default runs the two commands a user runs on their own dataset, on the embedded `nuclei` set
(downloaded once with pip, no manual step):

    python -m cssl_ray.tune   --space tune_spaces/nuclei_demo.yaml   # a small search, ASHA stops poor trials
    python -m cssl_ray.ablate --space tune_spaces/nuclei_demo.yaml   # cells x seeds at the best config

(nuclei_demo.yaml is nuclei.yaml with a 1000-step stage A and the ablation's 2 seeds of supervised,
the bn_mix control and CSSL; nuclei.yaml's full grid - 8 cells with the all-labelled
reference, 5 seeds - is the real measurement, docs/science.md), then prints the report table
(mean ± std over seeds, best-validation and last-round test Dice, round-1 coverage, patches per
step, p against supervised and bn_mix) read back from MLflow and the command that opens MLflow.
While the search trains its one stage A (seed 0), a second process trains the ablation's seed-1
stage A into the same cache (``warm_stage_a``), so both cores work from the start. Runs go under ``--out`` (default runs/demo, replaced
on every demo run); MLflow keeps every demo run (``./mlflow.db`` unless --tracking-uri /
$MLFLOW_TRACKING_URI).

``--synthetic`` is the earlier demo: each seed changes the generated images, the split and the
initialisation; the supervised arm has use_cl = use_cr = use_hard_negatives = false (the paper's
"fully supervised" row), so both arms get exactly the same supervised steps.
"""
from __future__ import annotations

import argparse
import dataclasses
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from cssl_ray.config import Config, ConfigError
from cssl_ray.experiments.train import build_config

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = ROOT / "configs" / "demo_synthetic.yaml"
DEMO_SPACE = ROOT / "tune_spaces" / "nuclei_demo.yaml"
SMOKE_SPACE = ROOT / "tune_spaces" / "smoke.yaml"
ARMS = {
    "supervised": dict(use_cl=False, use_cr=False, use_hard_negatives=False),
    "cssl": dict(use_cl=True, use_cr=True, use_hard_negatives=True),
}
REFERENCE = "supervised, all labels"  # the ceiling: every training image labelled, same schedule


def arm_config(cfg: Config, arm: str, seed: int, out_root: Path) -> Config:
    switches = ARMS["supervised" if arm == REFERENCE else arm]
    folder = "reference" if arm == REFERENCE else arm
    train = dataclasses.replace(cfg.train, seed=seed, out_dir=str(out_root / f"{folder}_seed{seed}"), **switches)
    data = dataclasses.replace(cfg.data, seed=seed)
    if arm == REFERENCE:
        data = dataclasses.replace(data, labelled_fraction=1.0, labelled_count=0)
    return dataclasses.replace(cfg, train=train, data=data)


def format_table(results: dict[str, list[dict[str, float]]], class_names: list[str]) -> str:
    keys = ["dice_mean"] + [f"dice/{c}" for c in class_names[1:]]
    lines = ["| arm | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for arm, runs in results.items():
        cells = []
        for k in keys:
            vals = [r[k] for r in runs if k in r and r[k] == r[k]]
            if not vals:
                cells.append("n/a")
            elif len(vals) == 1:
                cells.append(f"{vals[0]:.3f}")
            else:
                cells.append(f"{statistics.mean(vals):.3f} ± {statistics.stdev(vals):.3f}")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def warm_stage_a(space_path: Path, seed: int, cache: Path) -> Any:
    """Start a process that trains the stage A the ablation's ``seed`` will share, into ``cache``
    (the experiments' stage-A cache), while the search trains its own (seed 0). None when the
    search changes anything stage A depends on (then the ablation's stage A depends on the tuned
    values, unknown yet), or when the space's trials are not in-process."""
    import multiprocessing

    from cssl_ray.experiments.search_space import load_space

    space = load_space(space_path)
    base = space.select(space.base_config(), None, None)
    if space.resources.workers != 0 or searches_stage_a(space, base):
        return None
    train = dataclasses.replace(base.train, seed=seed, max_rounds=0, progress=False, figures=False,
                                use_cl=False, use_cr=False, use_hard_negatives=False,
                                out_dir=str(cache.parent / f"warm_stage_a_seed{seed}"))
    cfg = dataclasses.replace(base, train=train)
    process = multiprocessing.get_context("spawn").Process(target=_stage_a_only, args=(cfg, cache), daemon=True)
    process.start()
    return process


def searches_stage_a(space: Any, base: Config) -> bool:
    """Whether a key the space searches moves the stage-A cache key (``local.stage_a_key``)."""
    from cssl_ray.run.local import stage_a_key

    for key in space.search:
        section, _, name = key.partition(".")
        section_cfg = getattr(base, section)
        changed = dataclasses.replace(base, **{section: dataclasses.replace(
            section_cfg, **{name: _other(getattr(section_cfg, name))})})
        if stage_a_key(changed) != stage_a_key(base):
            return True
    return False


def _other(value: Any) -> Any:
    """A value of ``value``'s type that differs from it (to see whether a searched key moves the stage-A key)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    return f"{value}_other"


def _stage_a_only(cfg: Config, cache: Path) -> None:
    from cssl_ray.run.local import run_local

    run_local(cfg, stage_a_cache=cache)


def run_space_demo(space: Path, out: Path, seeds: int | None, tracking_uri: str | None, smoke: bool) -> int:
    """tune, then ablate at the tuned config, on one space; the ablation prints the report."""
    from cssl_ray.experiments import ablate, tune
    from cssl_ray.experiments.search_space import load_space

    name = load_space(space).name
    for folder in (out / f"{name}-tune", out / f"{name}-ablate", out / "stage_a", out / "warm_stage_a_seed1"):  # a fresh demo
        shutil.rmtree(folder, ignore_errors=True)
    common = ["--space", str(space), "--storage-path", str(out)]
    if tracking_uri:
        common += ["--tracking-uri", tracking_uri]
    extra = ["--workers", "0"] if smoke else []  # smoke: in-process trials, no Ray Train start-up
    cells = ["--cells", "supervised", "cssl"] if smoke else []  # else the space's ablation cells
    seed_args = ["--seeds", str(seeds)] if seeds else []
    n_seeds = seeds or load_space(space).ablation.seeds
    started = time.perf_counter()
    warm = warm_stage_a(space, 1, out / "stage_a") if n_seeds > 1 and not smoke else None
    print(f"== 1/2  python -m cssl_ray.tune --space {space.relative_to(ROOT) if space.is_relative_to(ROOT) else space}",
          flush=True)
    try:
        code = tune.main(common + extra)
        if code != 0:
            return code
        if warm is not None:
            warm.join()  # the ablation's seed-1 stage A, trained beside the search's
        print(f"\n== 2/2  python -m cssl_ray.ablate --space ... {' '.join(seed_args + cells)}".rstrip(), flush=True)
        code = ablate.main(common + extra + cells + seed_args)
    finally:
        if warm is not None and warm.is_alive():
            warm.terminate()
    print(f"\ndemo wall time: {time.perf_counter() - started:.0f} s", flush=True)
    return code


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cssl_ray.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--synthetic", action="store_true", help="the synthetic supervised-vs-CSSL table instead")
    p.add_argument("--smoke", action="store_true", help="tiny: seconds to a minute")
    p.add_argument("--space", help=f"the search space (default {DEMO_SPACE.relative_to(ROOT)})")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else ./mlflow.db)")
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="--synthetic: the config")
    p.add_argument("--seeds", type=int, nargs="+", help="--synthetic: seeds (default 0 1 2); else: one number, "
                   "seeds per ablation cell (default: the space's, 2)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="--synthetic")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--no-reference", action="store_true",
                   help="--synthetic: skip the supervised run with every training image labelled (the ceiling)")
    args = p.parse_args(argv)
    if not args.synthetic:
        space = Path(args.space) if args.space else (SMOKE_SPACE if args.smoke else DEMO_SPACE)
        seeds = args.seeds[0] if args.seeds else None  # None: the space's (nuclei_demo: 2)
        return run_space_demo(space.resolve(), Path(args.out).resolve(), seeds, args.tracking_uri, args.smoke)
    return synthetic_demo(args)


def synthetic_demo(args: argparse.Namespace) -> int:
    args.seeds = args.seeds or [0, 1, 2]
    try:
        cfg = build_config(args.config, args.overrides + ["train.progress=false"], smoke=args.smoke)
    except (ConfigError, FileNotFoundError) as e:
        print(f"cssl_ray.demo: error: {e}", file=sys.stderr)
        return 2
    from cssl_ray.data.synthetic import class_names
    from cssl_ray.run.local import run_local

    names = class_names(cfg.data.num_classes)
    arms = list(ARMS) + ([] if args.no_reference else [REFERENCE])
    results: dict[str, list[dict[str, float]]] = {arm: [] for arm in arms}
    for seed in args.seeds:
        for arm in arms:
            r = run_local(arm_config(cfg, arm, seed, Path(args.out)))
            results[arm].append(r.test)
            print(f"seed {seed} {arm:>22}: test dice_mean {r.test['dice_mean']:.3f} "
                  f"(best round {r.best_round}, {r.seconds:.0f} s)", flush=True)
    print(f"\nTest Dice on {cfg.data.name} ({len(args.seeds)} seed(s), {cfg.data.labelled_fraction:.0%} "
          f"labelled, mean ± std over seeds):\n")
    print(format_table(results, names))
    return 0


if __name__ == "__main__":
    sys.exit(main())
