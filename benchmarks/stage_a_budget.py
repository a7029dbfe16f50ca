"""Stage A's budget: validation Dice of supervised-only runs against optimiser steps.

    python benchmarks/stage_a_budget.py --config configs/nuclei.yaml --steps 3000 [--seed 0]
                                        [--labels few all] [--at 300 600 900 1200 1500 1800 2400 3000]
                                        [--set key=value ...] [--json PATH]

Runs stage A alone (``train.max_rounds: 0``, no CL / CR) for ``--steps`` steps, once with the
config's labelled share ("few") and once with every training image labelled ("all"), and prints
the validation dice_mean at the steps of ``--at``, where the rate was first cut (the training-loss
plateau, ``optim.plateau_metric``), and the test metrics at the end. A config's
``train.stage_a_steps`` is where the "all" curve stops improving (docs/science.md, section 0.2):
that is where the label headroom a semi-supervised method can recover is fully shown. Choose it on
the validation curve; the test column is reported, never selected on.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def run(config: str, steps: int, seed: int, labels: str, threads: int, out: Path,
        overrides: list[str] = ()) -> dict[str, Any]:
    from cssl_ray.experiments.train import build_config
    from cssl_ray.run.local import run_local

    sets = [f"train.stage_a_steps={steps}", "train.max_rounds=0", f"train.seed={seed}", f"train.num_threads={threads}",
            "train.progress=false", "train.figures=false", f"train.out_dir={out / labels}",
            "train.use_cl=false", "train.use_cr=false"]
    if labels == "all":
        sets += ["data.labelled_fraction=1.0", "data.labelled_count=0"]
    started = time.perf_counter()
    result = run_local(build_config(config, [*overrides, *sets]))
    curve = [{k: h[k] for k in ("stage_a_step", "loss_sup", "val_dice_mean", "val_loss", "lr")}
             for h in result.history if h["stage"] == "supervised"]
    return {"labels": labels, "seconds": time.perf_counter() - started, "test": result.test, "curve": curve}


def at_step(curve: list[dict[str, Any]], step: int) -> float | None:
    """Validation dice_mean of the last epoch that ended at or before ``step`` (None past the run)."""
    done = [c for c in curve if c["stage_a_step"] <= step]
    return done[-1]["val_dice_mean"] if done and curve[-1]["stage_a_step"] >= step else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--steps", type=int, required=True, help="stage-A steps of each run (longer than the budget)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--labels", nargs="+", default=["few", "all"], choices=["few", "all"])
    p.add_argument("--at", type=int, nargs="+", default=[300, 600, 900, 1200, 1500, 1800, 2400, 3000])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="an override of the config for both runs")
    p.add_argument("--json", default=None, help="default benchmarks/results/stage_a_budget_<config>.json")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="stage_a_budget_"))
    runs = [run(args.config, args.steps, args.seed, labels, args.threads, work, args.overrides)
            for labels in args.labels]
    at = [s for s in args.at if s <= args.steps]
    print("| labels | " + " | ".join(str(s) for s in at) + " | first rate cut | test dice_mean (end) | seconds |")
    print("|---" * (len(at) + 4) + "|")
    for r in runs:
        cut = next((c["stage_a_step"] for c in r["curve"] if c["lr"] < r["curve"][0]["lr"]), None)
        vals = [at_step(r["curve"], s) for s in at]
        print(f"| {r['labels']} | " + " | ".join("" if v is None else f"{v:.3f}" for v in vals)
              + f" | {cut if cut is not None else 'none'} | {r['test']['dice_mean']:.3f} | {r['seconds']:.0f} |")
    out = Path(args.json or Path(__file__).parent / "results" / f"stage_a_budget_{Path(args.config).stem}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": args.config, "steps": args.steps, "seed": args.seed,
                               "machine": platform.platform(), "runs": runs}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
