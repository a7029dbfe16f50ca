"""The GPU check: what a session lent a GPU machine runs, as one script, in under 5 minutes.

    bash benchmarks/gpu_check.sh [--out DIR] [--budget-s 280]      # on one CUDA GPU
    bash benchmarks/gpu_check.sh --dry-run                         # anywhere: checks and the plan

Prints one JSON line per figure (``{"figure": ..., ...}``) and writes them all to ``DIR/gpu_check.json``:

- ``ray_train_bf16_shared``: a 1-worker Ray Train run of the smoke config on CUDA under bf16 autocast
  with channels_last, the worker on 0.5 GPU and its pseudo-labeller on the other 0.5 of the same
  GPU (a labeller sharing the GPU through a fractional request); wall time, test Dice, best round.
- ``ray_train_fp16``: the same run under fp16 (GradScaler) on a whole GPU, the labeller on CPU.
- ``contrastive_loss_6528``: the closed-form L_CL forward + backward at N = 6528 patch embeddings
  (the paper's 816 x 8 ranks) on the GPU: median time and peak memory
  (``benchmarks/contrastive_loss.py``; its N = 816 naive-vs-closed comparison rides along).
- ``train_step_bf16``: one CSSL step (L_CL + L_CR + Adam) at the paper's geometry under bf16 and
  channels_last, as a fraction of this GPU's measured bf16 matmul rate; the fp32 step against the
  fp32 matmul beside it (``benchmarks/train_step.py --preset paper``).

Each figure runs as its own subprocess under a timeout taken from what is left of ``--budget-s``, so
one that hangs or fails is a line with ``"ok": false`` and its last error line, and the rest still
run. ``--dry-run``: no GPU needed; prints each figure's command (``"planned": true``), runs the
training commands' own ``--dry-run`` (config, dataset, the resource checks made before Ray starts),
and exits 0 only if they pass. ``--cpu`` (tests): the same figures at tiny sizes on the CPU, without
the Ray runs.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"


def figures(out: Path, cpu: bool) -> list[dict[str, Any]]:
    """Each figure: its name, its command, the share of the budget it may take, and how its result
    becomes one JSON line (``read``)."""
    py = sys.executable
    train = [py, "-m", "cssl_ray.train", "--smoke", "--workers", "1", "--no-track", "--quiet"]
    runs = [] if cpu else [
        dict(figure="ray_train_bf16_shared", share=0.25, read=read_train,
             cmd=[*train, "--out", str(out / "bf16"), "--gpus-per-worker", "0.5", "--gpus-per-labeller", "0.5",
                  "--set", "train.amp=bf16", "--set", "train.channels_last=true", "--set", "train.device=cuda"]),
        dict(figure="ray_train_fp16", share=0.25, read=read_train,
             cmd=[*train, "--out", str(out / "fp16"), "--gpus-per-worker", "1",
                  "--set", "train.amp=fp16", "--set", "train.device=cuda"]),
    ]
    device = "cpu" if cpu else "cuda"
    size = ["--n", "64", "--n-large", "256", "--repeats", "2"] if cpu else ["--repeats", "5"]
    step = ["--smoke", "--repeats", "2", "--warmup", "1", "--no-breakdown"] if cpu else ["--preset", "paper"]
    return runs + [
        dict(figure="contrastive_loss_6528", share=0.2, read=read_contrastive,
             cmd=[py, str(BENCH / "contrastive_loss.py"), "--device", device, *size,
                  "--json", str(out / "contrastive_loss.json")]),
        dict(figure="train_step_bf16", share=0.3, read=read_train_step,
             cmd=[py, str(BENCH / "train_step.py"), "--device", device, *step, "--json", str(out / "train_step.json")]),
    ]


def read_train(stdout: str, fig: dict[str, Any]) -> dict[str, Any]:
    """``cssl_ray.experiments.train``'s closing JSON (the last ``{`` block of its output)."""
    text = stdout[stdout.rindex("\n{") + 1:] if "\n{" in stdout else stdout[stdout.index("{"):]
    r = json.loads(text)
    return {"run_seconds": r["seconds"], "best_round": r["best_round"], "test_dice_mean": r["test"].get("dice_mean")}


def _json_arg(fig: dict[str, Any]) -> dict[str, Any]:
    return json.loads(Path(fig["cmd"][fig["cmd"].index("--json") + 1]).read_text())


def read_contrastive(stdout: str, fig: dict[str, Any]) -> dict[str, Any]:
    r = _json_arg(fig)
    large = r["closed_large"]
    return {"n": r["config"]["n_large"], "time_ms": 1e3 * large["time_s"], "peak_mib": large["peak_bytes"] / 2**20,
            "speedup_vs_naive_at_816": r["speedup"], "gpu": r["machine"]["gpu"]}


def read_train_step(stdout: str, fig: dict[str, Any]) -> dict[str, Any]:
    r = _json_arg(fig)
    line = {"device": r["machine"]["name"], "fp32_step_ms": 1e3 * r["step"]["median_s"],
            "fp32_fraction_of_fp32_matmul": r["ratio"]}
    bf16 = r.get("cuda_bf16")
    if bf16:
        line.update(bf16_step_ms=1e3 * bf16["step"]["median_s"], bf16_images_per_s=bf16["step"]["images_per_s"],
                    bf16_matmul_tflops=bf16["bf16_matmul_gflops_per_s"] / 1e3,
                    bf16_fraction_of_bf16_matmul=bf16["percent_of_peak"] / 100)
    return line


def run_figure(fig: dict[str, Any], timeout: float) -> dict[str, Any]:
    start = time.perf_counter()
    line: dict[str, Any] = {"figure": fig["figure"]}
    try:
        done = subprocess.run(fig["cmd"], capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    except subprocess.TimeoutExpired:
        return {**line, "ok": False, "error": f"timed out after {timeout:.0f} s", "wall_s": round(timeout, 1)}
    line["wall_s"] = round(time.perf_counter() - start, 1)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or done.stdout.strip().splitlines() or ["(no output)"])[-1]
        return {**line, "ok": False, "rc": done.returncode, "error": last[-300:]}
    try:
        return {**line, "ok": True, **fig["read"](done.stdout, fig)}
    except (ValueError, KeyError, OSError) as e:
        return {**line, "ok": False, "error": f"could not read the figure: {e}"}


def dry_run(figs: list[dict[str, Any]]) -> int:
    """Print each figure's plan; run the training commands' own --dry-run (no GPU needed: ``--address
    auto`` lifts the check of this machine's GPUs, which is what a GPU machine provides)."""
    rc = 0
    for fig in figs:
        line = {"figure": fig["figure"], "planned": True, "command": " ".join(fig["cmd"])}
        if "cssl_ray.train" in fig["cmd"]:
            check = [a for a in fig["cmd"] if a not in ("--quiet",)] + ["--dry-run", "--address", "auto"]
            done = subprocess.run(check, capture_output=True, text=True, cwd=ROOT,
                                  env={**os.environ, "PYTHONPATH": str(ROOT)})
            line["dry_run_ok"] = done.returncode == 0
            if done.returncode:
                line["error"] = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
                rc = 1
        print(json.dumps(line), flush=True)
    return rc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/gpu_check", help="folder of the runs and gpu_check.json")
    ap.add_argument("--budget-s", type=float, default=280.0, help="wall-clock budget of all figures together")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and check the runs' settings; no GPU")
    ap.add_argument("--cpu", action="store_true", help="tiny figures on the CPU, no Ray runs (tests)")
    args = ap.parse_args(argv)
    out = Path(args.out).resolve()
    figs = figures(out, args.cpu)
    if args.dry_run:
        return dry_run(figs)
    if not args.cpu:
        import torch
        if not torch.cuda.is_available():
            print(json.dumps({"figure": "cuda", "ok": False, "error": "no CUDA device: run with --dry-run or --cpu"}))
            return 2
    out.mkdir(parents=True, exist_ok=True)
    start, lines = time.perf_counter(), []
    total_share = sum(f["share"] for f in figs)
    for fig in figs:
        left = args.budget_s - (time.perf_counter() - start)
        if left < 10:
            lines.append({"figure": fig["figure"], "ok": False, "error": "no budget left"})
        else:
            lines.append(run_figure(fig, max(10.0, min(left, args.budget_s * fig["share"] / total_share * 1.5))))
        print(json.dumps(lines[-1]), flush=True)
    summary = {"figures": lines, "wall_s": round(time.perf_counter() - start, 1), "cpu": args.cpu}
    (out / "gpu_check.json").write_text(json.dumps(summary, indent=2))
    return 0 if all(line.get("ok") for line in lines) else 1


if __name__ == "__main__":
    sys.exit(main())
