"""Demo: supervised-only vs CSSL on the synthetic set, over seeds, in one process.

    python -m cssl_ray.demo                      # configs/demo_synthetic.yaml, seeds 0 1 2
    python -m cssl_ray.demo --smoke --seeds 0    # seconds

Each seed changes the generated images, the labelled/unlabelled split and the model's
initialisation. Both arms use the same config and schedule; the supervised arm has
use_cl = use_cr = use_hard_negatives = false (the paper's "fully supervised" row), so both get
exactly the same supervised steps. Test metrics come from each run's best-validation weights.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from pathlib import Path

from cssl_ray.config import Config, ConfigError
from cssl_ray.train import build_config

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo_synthetic.yaml"
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cssl_ray.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(DEFAULT_CONFIG))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--no-reference", action="store_true",
                   help="skip the supervised run with every training image labelled (the ceiling)")
    args = p.parse_args(argv)
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
