"""The demo: hyperparameter search, then the ablation grid, on real nuclei images, recorded in MLflow.

    python -m cssl_ray.demo                      # tune_spaces/nuclei.yaml: ~15 min on a 2-core CPU
    python -m cssl_ray.demo --smoke              # tune_spaces/smoke.yaml, in-process trials: ~1 min
    python -m cssl_ray.demo --synthetic          # supervised vs CSSL vs all labels on synthetic data

The default runs the two commands a user runs on their own dataset, on the embedded `nuclei` set
(downloaded once with pip, no manual step):

    python -m cssl_ray.tune   --space tune_spaces/nuclei.yaml    # a small search, ASHA stops poor trials
    python -m cssl_ray.ablate --space tune_spaces/nuclei.yaml    # Table 5 cells x seeds at the best config

(the demo's ablation: supervised, CL, CR and CSSL over 2 seeds; the space's full grid - 7 cells,
with the all-labelled reference, over 5 seeds - is the second command as written, ~40 min), then
prints the report table (mean ± std over seeds, t-test against fully supervised) read back
from MLflow and the command that opens MLflow. Runs go under ``--out`` (default runs/demo, replaced
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

from cssl_ray.config import Config, ConfigError
from cssl_ray.train import build_config

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = ROOT / "configs" / "demo_synthetic.yaml"
DEMO_SPACE = ROOT / "tune_spaces" / "nuclei.yaml"
SMOKE_SPACE = ROOT / "tune_spaces" / "smoke.yaml"
DEMO_CELLS = ["supervised", "cl", "cr", "cssl"]  # the CPU demo's ablation; the space holds the full grid
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


def run_space_demo(space: Path, out: Path, seeds: int, tracking_uri: str | None, smoke: bool) -> int:
    """tune, then ablate at the tuned config, on one space; the ablation prints the report."""
    from cssl_ray import ablate, tune
    from cssl_ray.search_space import load_space

    name = load_space(space).name
    for folder in (out / f"{name}-tune", out / f"{name}-ablate", out / "stage_a"):  # the demo's own: a fresh demo
        shutil.rmtree(folder, ignore_errors=True)
    common = ["--space", str(space), "--storage-path", str(out)]
    if tracking_uri:
        common += ["--tracking-uri", tracking_uri]
    extra = ["--workers", "0"] if smoke else []  # smoke: in-process trials, no Ray Train start-up
    cells = ["--cells", *(["supervised", "cssl"] if smoke else DEMO_CELLS)]
    started = time.perf_counter()
    print(f"== 1/2  python -m cssl_ray.tune --space {space.relative_to(ROOT) if space.is_relative_to(ROOT) else space}",
          flush=True)
    code = tune.main(common + extra)
    if code != 0:
        return code
    print(f"\n== 2/2  python -m cssl_ray.ablate --space ... --seeds {seeds} {' '.join(cells)}", flush=True)
    code = ablate.main(common + extra + cells + ["--seeds", str(seeds)])
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
                   "seeds per ablation cell (default 2)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="--synthetic")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--no-reference", action="store_true",
                   help="--synthetic: skip the supervised run with every training image labelled (the ceiling)")
    args = p.parse_args(argv)
    if not args.synthetic:
        space = Path(args.space) if args.space else (SMOKE_SPACE if args.smoke else DEMO_SPACE)
        seeds = args.seeds[0] if args.seeds else 2  # the 5-seed grid is the ablate command itself
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
    from cssl_ray.local import run_local

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
