"""Benchmark: the trainer's two gradient syncs, explicit all-reduce (old) against DDP (new), on 2 gloo ranks.

    python benchmarks/grad_sync.py [--config configs/demo_synthetic.yaml] [--batch 8] [--repeats 10]
                                   [--json benchmarks/results/grad_sync.json] [--smoke]

``train.grad_sync: explicit`` (``cssl_ray.method.collectives``, the default) averages gradients with ONE
all-reduce of all of them, flattened, after every backward. ``train.grad_sync: ddp``
(``distributed.collectives.DDPCollectives``) runs each step's forward inside torch DDP around a step
module (so the CSSL step's encode / decode / project calls are inside it too) and all-reduces buckets
during the backward, overlapping communication with computation. This measures both as the trainer
runs them, on a supervised step (forward, cross-entropy, backward, gradient sync, Adam; the
projection head frozen, as no supervised loss reaches it) of the config's model on a batch of
``--batch`` images per rank, on 2 CPU processes (gloo), one torch thread each:

  none       no sync (each rank alone): the compute floor
  explicit   ``TorchCollectives.average_gradients`` after the backward (old, the default)
  ddp        ``DDPCollectives``: DDP around the step module, find_unused_parameters (new)

On gloo and CPUs there is little to overlap (the ranks share the cores that would compute); the
figure that matters, on NCCL and GPUs, is what ``benchmarks/gpu_check.sh`` is for.

Each mode: 2 warm-up steps, then the median of ``--repeats`` steps, rank 0's clock after a barrier.
Figures: ms per step, and explicit / ddp (target <= 1.1: not slower than DDP within 10%).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from cssl_ray.config import ConfigError, load_config, merge, to_dict
from cssl_ray.distributed.collectives import DDPCollectives, TorchCollectives
from cssl_ray.models import create_model

ROOT = Path(__file__).resolve().parents[1]
TARGET = 1.1
SMOKE: dict[str, Any] = {"model": {"base_channels": 4, "depth": 2, "embed_dim": 16, "proj_hidden": 16},
                         "data": {"image_size": [32, 32]}}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "demo_synthetic.yaml"), help="the model to train")
    ap.add_argument("--batch", type=int, default=8, help="images per rank per step")
    ap.add_argument("--repeats", type=int, default=10, help="timed steps per mode (median reported)")
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "grad_sync.json"))
    ap.add_argument("--smoke", action="store_true", help="tiny model and images, 3 steps")
    args = ap.parse_args(argv)
    if args.smoke:
        args.batch, args.repeats = 2, 3
    if args.batch < 1 or args.repeats < 1:
        raise SystemExit(f"grad_sync: --batch {args.batch}, --repeats {args.repeats}; allowed: >= 1 each")
    return args


def _time_steps(step, repeats: int) -> list[float]:
    times = []
    for i in range(repeats + 2):
        dist.barrier()
        t0 = time.perf_counter()
        step()
        dist.barrier()  # a step ends when both ranks are done
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return times


def _rank(rank: int, world: int, init_file: str, config: dict[str, Any], batch: int, repeats: int, out: dict) -> None:
    from cssl_ray.config import from_dict

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        cfg = from_dict(config)
        d = cfg.data
        g = torch.Generator().manual_seed(rank)
        x = torch.randn(batch, d.in_channels, *d.image_size, generator=g)
        y = torch.randint(0, d.num_classes, (batch, *d.image_size), generator=g)
        col = TorchCollectives(torch.device("cpu"))
        results: dict[str, list[float]] = {}
        for mode in ("none", "explicit", "ddp"):
            torch.manual_seed(0)
            model = create_model(cfg.model, d.in_channels, d.num_classes).train()
            for p in model.head.parameters():  # the projection head: no part of a supervised step
                p.requires_grad_(False)
            sync = DDPCollectives(torch.device("cpu"), model) if mode == "ddp" else col
            opt = torch.optim.Adam(model.parameters(), lr=1e-3)

            def step() -> None:
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(sync.step(model, lambda m: m(x)), y).backward()
                if mode != "none":
                    sync.average_gradients(model)  # DDPCollectives: already averaged during the backward
                opt.step()

            results[mode] = _time_steps(step, repeats)
        if rank == 0:
            out.update(results)
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, merge(SMOKE, {}) if args.smoke else {})
    except (ConfigError, FileNotFoundError) as e:
        raise SystemExit(f"grad_sync: {e}") from None
    with tempfile.TemporaryDirectory(prefix="cssl_grad_sync_") as tmp, mp.Manager() as manager:
        out = manager.dict()
        # spawned children import this script as __main__: run it as a script (the smoke test does)
        mp.spawn(_rank, args=(2, str(Path(tmp) / "init"), to_dict(cfg), args.batch, args.repeats, out), nprocs=2,
                 join=True)
        times = dict(out)
    median = {mode: statistics.median(t) for mode, t in times.items()}
    params = sum(p.numel() for p in create_model(cfg.model, cfg.data.in_channels, cfg.data.num_classes).parameters())
    ratio = median["explicit"] / median["ddp"]
    result = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                    "torch": torch.__version__, "load_average": os.getloadavg()[0]},
        "config": {"smoke": args.smoke, "config": args.config, "model": to_dict(cfg)["model"],
                   "image_size": list(cfg.data.image_size), "batch_per_rank": args.batch, "ranks": 2,
                   "repeats": args.repeats, "parameters": params},
        "step_s": median, "step_times_s": times, "explicit_over_ddp": ratio, "target": TARGET,
        "pass": ratio <= TARGET,
    }
    print(f"gradient sync on {result['machine']['cpu']} ({os.cpu_count()} cores), torch {torch.__version__}, "
          f"2 gloo ranks x 1 thread; {params / 1e6:.2f} M parameters, {args.batch} images of "
          f"{cfg.data.image_size[0]}x{cfg.data.image_size[1]} per rank")
    for mode in ("none", "explicit", "ddp"):
        print(f"{mode:>9}  {1e3 * median[mode]:8.1f} ms / step")
    print(f"explicit / ddp {ratio:.3f}   target <= {TARGET}   {'PASS' if result['pass'] else 'FAIL'}")
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
