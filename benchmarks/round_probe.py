"""The round probe: what one round, and a few, do to a converged stage A, variant by variant.

    python benchmarks/round_probe.py --config configs/demo_synthetic.yaml [--seeds 0 1 2] [--rounds 5]
                                     [--variants cssl cl cr ...] [--set key=value ...] [--json PATH]

For each seed, stage A is trained once (``train.stage_a_steps``, the config's budget) and shared
through the stage-A cache: every variant starts its rounds from the same converged weights, bit for
bit. Each variant then runs ``--rounds`` rounds of the product (``local.run_local``: pseudo-labels,
patches, its L_tot epoch, the fine-tune epoch, validation) with its overrides. Printed (and written
as JSON, one record per variant and seed): the validation dice_mean where the rounds start (stage
A's), its change after round 1 and after the last round, mean +- std over seeds, and the round-1
instruments (coverage per class, realised patches per step, the loss terms).

Validation only: nothing here looks at the test set. The variants (``VARIANTS``) are issue 13's:
CL only, CR only, CL + CR (the full method, hard negatives on); L_sup in every L_tot step; the
bn_mix control; a control that runs L_CL's passes at a rate of 1e-12; 5 passes over D_U per round;
the class-wise pseudo-label rule; and, with BatchNorm statistics frozen during L_tot (``+bn_frozen``,
the default before issue 13), the L_tot rate and L_CL weighted down against L_sup. The supervised
rounds (fine-tune epochs only) are the reference every variant shares.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

CELLS = {  # ablation_cells.ABLATION_CELLS, spelled out (the benchmark reads without importing the package first)
    "supervised": {"train.use_cl": False, "train.use_cr": False},
    "cl": {"train.use_cl": True, "train.use_cr": False, "train.use_hard_negatives": True},
    "cr": {"train.use_cl": False, "train.use_cr": True},
    "cssl": {"train.use_cl": True, "train.use_cr": True, "train.use_hard_negatives": True},
}
FROZEN = {"train.ltot_bn": "frozen"}  # BatchNorm running statistics as before issue 13
VARIANTS: dict[str, dict[str, Any]] = {  # plain names run the product's defaults (train.ltot_bn: update)
    "supervised": CELLS["supervised"],
    "bn_mix": {**CELLS["supervised"], "train.method": "bn_mix"},  # D_U only in the BN batches, no loss on it
    "cl": CELLS["cl"],
    "cr": CELLS["cr"],
    "cssl": CELLS["cssl"],
    "cssl+lsup": {**CELLS["cssl"], "train.lsup_in_ltot": True},
    "cssl x5 passes": {**CELLS["cssl"], "train.round_passes": 5},
    "cl x5 passes": {**CELLS["cl"], "train.round_passes": 5},
    "cssl, class_fraction 0.5": {**CELLS["cssl"], "pseudo.class_fraction": 0.5},
    # the control of cl: the same forward passes (BN running statistics see the patches) but L_CL's
    # rate ~0, so the weights do not learn from it
    "cl, no L_CL step": {**CELLS["cl"], "optim.cssl_lr": 1e-12},
    # the variants with the statistics frozen during L_tot (the default before issue 13)
    "cl+bn_frozen": {**CELLS["cl"], **FROZEN},
    "cr+bn_frozen": {**CELLS["cr"], **FROZEN},
    "cssl+bn_frozen": {**CELLS["cssl"], **FROZEN},
    "cl+lsup+bn_frozen": {**CELLS["cl"], **FROZEN, "train.lsup_in_ltot": True},
    "cr+lsup+bn_frozen": {**CELLS["cr"], **FROZEN, "train.lsup_in_ltot": True},
    "cssl+lsup+bn_frozen": {**CELLS["cssl"], **FROZEN, "train.lsup_in_ltot": True},
    "cssl+bn_frozen lr 1e-3": {**CELLS["cssl"], **FROZEN, "optim.cssl_lr": 1e-3},
    "cssl+bn_frozen lr 1e-5": {**CELLS["cssl"], **FROZEN, "optim.cssl_lr": 1e-5},
    "cssl+bn_frozen w_cl 0.1": {**CELLS["cssl"], **FROZEN, "train.w_cl": 0.1},
    "cssl+bn_frozen x5 passes": {**CELLS["cssl"], **FROZEN, "train.round_passes": 5},
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="a config YAML (its stage-A budget is the start)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), help=f"any of: {', '.join(VARIANTS)}")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="an override for every variant (e.g. pseudo.class_fraction=0.5)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work", default=None, help="folder for the runs and the shared stage A (default: a temp folder)")
    p.add_argument("--json", default=None, help="default benchmarks/results/round_probe_<config>.json")
    return p


def probe(config: str, seed: int, variant: str, rounds: int, overrides: list[str], threads: int,
          work: Path) -> dict[str, Any]:
    from cssl_ray.experiments.train import build_config
    from cssl_ray.run.local import run_local

    sets = [f"{k}={json.dumps(v)}" for k, v in VARIANTS[variant].items()]
    sets += [f"train.seed={seed}", f"train.max_rounds={rounds}", "train.progress=false", "train.figures=false",
             f"train.num_threads={threads}", "train.stop=max_rounds",
             f"train.out_dir={work / f'seed{seed}' / variant.replace(' ', '_')}"]
    cfg = build_config(config, overrides + sets)
    started = time.perf_counter()
    result = run_local(cfg, stage_a_cache=work / "stage_a")
    seconds = time.perf_counter() - started
    hist = result.history
    start = next(h for h in reversed(hist) if h["stage"] == "supervised")
    rounds_ = [h for h in hist if h["stage"] == "round"]
    first, last = rounds_[0], rounds_[-1]
    keep = ("pseudo_coverage", "pseudo_accuracy", "patches_per_step", "loss", "loss_cl", "loss_cr", "loss_sup_ltot",
            "omega", "lambda", "steps")
    return {
        "seed": seed, "variant": variant, "rounds": len(rounds_), "seconds": seconds,
        "val_start": start["val_dice_mean"], "val_round1": first["val_dice_mean"], "val_last": last["val_dice_mean"],
        "val_max": max(h["val_dice_mean"] for h in rounds_),
        "val_curve": [h["val_dice_mean"] for h in rounds_],
        "round1": {k: v for k, v in first.items() if k.startswith(keep) and isinstance(v, (int, float))},
    }


def _mean_sd(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:+.4f}" if values else "n/a"
    return f"{statistics.mean(values):+.4f} ± {statistics.stdev(values):.4f}"


def table(records: list[dict[str, Any]]) -> str:
    variants = list(dict.fromkeys(r["variant"] for r in records))
    lines = ["| variant | val Dice, stage A | Δ after round 1 | Δ after last round | Δ best round | rounds better than stage A |",
             "|---|---|---|---|---|---|"]
    for v in variants:
        rs = [r for r in records if r["variant"] == v]
        start = statistics.mean(r["val_start"] for r in rs)
        better = sum(sum(x > r["val_start"] for x in r["val_curve"]) for r in rs)
        total = sum(len(r["val_curve"]) for r in rs)
        lines.append(f"| {v} | {start:.4f} | {_mean_sd([r['val_round1'] - r['val_start'] for r in rs])} | "
                     f"{_mean_sd([r['val_last'] - r['val_start'] for r in rs])} | "
                     f"{_mean_sd([r['val_max'] - r['val_start'] for r in rs])} | {better} / {total} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        print(f"error: unknown variant(s) {', '.join(unknown)}; choose from: {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    import torch

    torch.set_num_threads(args.threads)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="round_probe_"))
    records = []
    for seed in args.seeds:
        for variant in args.variants:
            rec = probe(args.config, seed, variant, args.rounds, args.overrides, args.threads, work)
            records.append(rec)
            r1 = rec["round1"]
            cov = ", ".join(f"{k.split('/')[1]} {100 * v:.0f}%" for k, v in r1.items()
                            if k.startswith("pseudo_coverage/") and not math.isnan(v))
            print(f"seed {seed} {variant:>15}: val {rec['val_start']:.4f} -> {rec['val_round1']:.4f} (round 1) -> "
                  f"{rec['val_last']:.4f} (round {rec['rounds']}); patches/step {r1.get('patches_per_step', 0):.0f}; "
                  f"coverage {cov or '-'}; {rec['seconds']:.0f} s", flush=True)
    print()
    print(table(records))
    out = Path(args.json or Path(__file__).parent / "results" / f"round_probe_{Path(args.config).stem}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": args.config, "seeds": args.seeds, "rounds": args.rounds,
                               "overrides": args.overrides, "machine": platform.platform(),
                               "cpus": __import__("os").cpu_count(), "records": records}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
