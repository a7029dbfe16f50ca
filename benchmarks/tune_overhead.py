"""Benchmark: Ray overhead of a Tune trial vs the same run in a single process (DESIGN.md section 5).

    python benchmarks/tune_overhead.py [--config configs/demo_synthetic.yaml] [--set KEY=VALUE ...]
                                       [--threads 1] [--modes local trial train] [--json ...] [--smoke]

Three ways to run the SAME config (same seed, same schedule), timed in this one invocation:
    local   cssl_ray.run.local.run_local in this process (the reference)
    trial   one Tune trial that trains in-process (space resources.workers: 0)
    train   one Tune trial that fits a 1-worker Ray Train run inside it (Train-inside-Tune)
For each Tune mode two times: the trial's own wall time (Tune's time_total_s: from the trial's
start to its last report; the test evaluation after the last round is outside it, so the local
reference is timed to its last validation too) and the whole command (ray.init, the trial actor's
start, MLflow writes, shutdown). Target: trial time <= 1.3x the single-process run.
Prints a table and writes JSON (default benchmarks/results/tune_overhead.json).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TARGET = 1.3


def timed_local(cfg) -> dict[str, float]:
    from cssl_ray.run.local import run_local

    marks: list[float] = []
    start = time.perf_counter()
    run_local(cfg, log=lambda record: marks.append(time.perf_counter()))
    end = time.perf_counter()
    return {"run_s": marks[-1] - start if marks else end - start, "command_s": end - start}


def timed_tune(config_path: Path, workers: int, tmp: Path, threads: int) -> dict[str, float]:
    from cssl_ray.experiments.search_space import load_space
    from cssl_ray.experiments.trials import run_experiment

    space_path = tmp / f"overhead_w{workers}.yaml"
    cfg = yaml.safe_load(config_path.read_text())
    space_path.write_text(yaml.safe_dump({
        "name": f"overhead_w{workers}", "dataset": cfg["data"]["name"], "base": str(config_path),
        "search": {"train.seed": {"grid": [cfg["train"].get("seed", 0)]}}, "scheduler": {"name": "fifo"},
        "resources": {"workers": workers, "cpus_per_worker": 1 if workers == 0 else 0.5},
        "max_concurrent_trials": 1, "metric": "val_dice_mean", "mode": "max"}))
    space = load_space(space_path)
    start = time.perf_counter()
    outcomes, _ = run_experiment(space, param_space=space.param_space(), kind="tune", tune_name=space.name,
                                 base=space.base_config(), uri=f"sqlite:///{tmp / 'mlflow.db'}",
                                 storage=tmp / "tune", threads=threads, log=lambda line: None)
    command = time.perf_counter() - start
    trial = outcomes[0].metric_analysis.get("time_total_s", {}).get("last", float("nan"))
    return {"run_s": float(trial), "command_s": command}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "demo_synthetic.yaml"))
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared 2-core machine)")
    ap.add_argument("--modes", nargs="+", default=["local", "trial", "train"], choices=["local", "trial", "train"])
    ap.add_argument("--smoke", action="store_true", help="the tiny smoke config: seconds, figures meaningless")
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "tune_overhead.json"))
    args = ap.parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")

    from cssl_ray.config import dump_config
    from cssl_ray.experiments.train import build_config

    overrides = args.overrides + [f"train.num_threads={args.threads}", "train.progress=false", "train.figures=false"]
    with tempfile.TemporaryDirectory(prefix="tune_overhead_") as d:
        tmp = Path(d)
        cfg = build_config(None if args.smoke else args.config, overrides + [f"train.out_dir={tmp / 'local'}"],
                           smoke=args.smoke)
        config_path = tmp / "config.yaml"
        dump_config(cfg, config_path)
        import torch
        torch.set_num_threads(args.threads)
        times: dict[str, dict[str, float]] = {}
        for mode in args.modes:
            if mode == "local":
                times[mode] = timed_local(cfg)
            else:
                times[mode] = timed_tune(config_path, 0 if mode == "trial" else 1, tmp, args.threads)
            print(f"{mode:>6}: run {times[mode]['run_s']:.1f} s, command {times[mode]['command_s']:.1f} s", flush=True)
    ref = times.get("local", {}).get("run_s")
    ratios = {m: {"run": t["run_s"] / ref, "command": t["command_s"] / times["local"]["command_s"]}
              for m, t in times.items() if ref and m != "local"}
    print("\n| mode | run s | command s | run / local | command / local |\n|---|---|---|---|---|")
    for m, t in times.items():
        r = ratios.get(m, {"run": 1.0, "command": 1.0})
        print(f"| {m} | {t['run_s']:.1f} | {t['command_s']:.1f} | {r['run']:.2f} | {r['command']:.2f} |")
    result = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_avg": os.getloadavg()},
              "config": {"path": None if args.smoke else args.config, "overrides": args.overrides,
                         "threads": args.threads, "smoke": args.smoke},
              "times": times, "ratios": ratios, "target": TARGET,
              "pass": {m: r["run"] <= TARGET for m, r in ratios.items()}}
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
