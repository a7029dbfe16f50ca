"""Benchmark: the trainer's labelling stream (``pipeline.RankSteps``) against the L_tot epoch that consumes it.

    python benchmarks/patch_stream.py [--images 256] [--size 96] [--labellers 1 2] [--threads 1]
                                      [--ray-run] [--json benchmarks/results/patch_stream.json] [--smoke]

Workload: the demo's geometry (configs/demo_synthetic.yaml: attention U-Net base 8 depth 3, 32 px
patches, ``patches.per_image`` windows per image, L_CL batches of ``patches.batch_size`` patches, L_CR
batches of ``consistency.batch_size`` images) over ``--images`` synthetic images of ``--size`` px,
10% of them labelled (D_L, ground truth) and the rest unlabelled (D_U, pseudo-labelled by the
stream). A random model pseudo-labels nothing at the threshold, so the model first takes
``--pretrain-steps`` supervised Adam steps on the images' masks.

Figures, all from one run in one process (one Ray instance, one model), each for the epoch's
plan of one rank (``plan.epoch_plan``: a shuffled pass over D_U in batches of consistency.batch_size):
  consumption  ``loop.cssl_epoch`` over the same steps prepared in memory (``plan.local_steps``,
               nothing to wait for): steps per second of the trainer alone.
  stream       per ``--labellers`` value: one ``RankSteps`` pass (the run's ``LabellerPool``, one Ray
               Data row per step, in step order) iterated with nothing else running: steps per
               second after the first step, and the first step's wait (the stream's start).
  ratio        stream / consumption, after the first step (target >= 2).
  streamed     ``loop.cssl_epoch`` consuming ``RankSteps`` as ``ray_train`` does: ``data_wait_frac`` =
               time blocked on the next step over the epoch's time, both after the first step
               (target < 5%), the same formula as the runs' own ``data_wait_frac``.
  ray run      with ``--ray-run``: ``ray_train.run_ray`` on the same geometry (1 worker, 2 rounds,
               ``--labellers``' first value): each round's ``data_wait_frac``, ``first_step_wait_s``
               and ``epoch_s`` as the run itself recorded them (its workers and the labellers
               share the machine).

On a 2-core machine the labellers, the stream's tasks and the trainer share the same 2 cores: the
stream-alone and trainer-alone rates each had the machine to themselves, the streamed run has them
competing. ``--threads`` (default 1) is the trainer's torch threads.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from cssl_ray.config import Config, ConfigError, load_config, merge, to_dict
from cssl_ray.data.bundle import DataSource
from cssl_ray.data.splits import Split
from cssl_ray.data.synthetic import class_names, make_synthetic
from cssl_ray.method.consistency import Teacher, noise_variance
from cssl_ray.method.streams import RandomStreams
from cssl_ray.models import check_geometry, create_model
from cssl_ray.run.labelling import label_round
from cssl_ray.run.loop import cssl_epoch
from cssl_ray.run.plan import epoch_plan, local_steps

ROOT = Path(__file__).resolve().parents[1]
TARGET_RATIO, TARGET_WAIT = 2.0, 0.05
SMOKE: dict[str, Any] = {
    "model": {"base_channels": 4, "depth": 2, "embed_dim": 16, "proj_hidden": 16},
    "patches": {"size": 16, "min_pixels": 10, "per_image": 6, "batch_size": 12},
    "consistency": {"batch_size": 2},
    "pseudo": {"threshold": 0.5},  # 20 supervised steps of a tiny model reach no 0.9 confidence
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "demo_synthetic.yaml"),
                    help="run config giving the geometry (model, patches, batch sizes)")
    ap.add_argument("--images", type=int, default=256, help="synthetic images (D_L + D_U)")
    ap.add_argument("--size", type=int, default=96, help="image height and width, px")
    ap.add_argument("--labelled", type=float, default=0.1, help="fraction of the images in D_L (ground truth)")
    ap.add_argument("--labellers", type=int, nargs="+", default=[1, 2], help="LabellerPool sizes to measure")
    ap.add_argument("--threads", type=int, default=1, help="the trainer's torch threads (0 = torch's default)")
    ap.add_argument("--pretrain-steps", type=int, default=150, help="supervised steps before labelling")
    ap.add_argument("--ray-run", action="store_true", help="also a real 1-worker ray_train run of 2 rounds")
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "patch_stream.json"))
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, seconds of compute (plus Ray's start)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.images, args.size, args.pretrain_steps = 14, 32, 20
    if args.images < 2:
        raise SystemExit(f"patch_stream: --images {args.images}; allowed: >= 2")
    if min(args.labellers) < 1:
        raise SystemExit(f"patch_stream: --labellers {args.labellers}; allowed: >= 1 each")
    return args


def resolve_config(args: argparse.Namespace) -> Config:
    extra: dict[str, Any] = merge(SMOKE, {}) if args.smoke else {}
    extra = merge(extra, {"data": {"image_size": [args.size, args.size]}})
    try:
        cfg = load_config(args.config, extra)
        check_geometry(cfg.model, cfg.data.image_size, cfg.patches.size)
    except (ConfigError, FileNotFoundError) as e:
        raise SystemExit(f"patch_stream: {e}") from None
    return cfg


def pretrain(model: torch.nn.Module, images: torch.Tensor, masks: torch.Tensor, cfg: Config, steps: int) -> None:
    """A few supervised Adam steps, so that some pixels pass the pseudo-label threshold."""
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        idx = torch.randint(images.shape[0], (cfg.train.batch_size,), generator=g)
        loss = F.cross_entropy(model(images[idx]), masks[idx], ignore_index=cfg.pseudo.ignore_index)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def epoch(model: torch.nn.Module, cfg: Config, steps: Any, n_steps: int) -> dict[str, Any]:
    """One L_tot epoch (``loop.cssl_epoch``) over ``steps`` on a copy of ``model``: the weights being
    labelled with stay as they are. Returns its wall time and statistics."""
    import copy

    student = copy.deepcopy(model).train()
    optimizer = torch.optim.Adam(student.parameters(), lr=cfg.optim.cssl_lr or cfg.optim.lr)
    t0 = time.perf_counter()
    stats = cssl_epoch(student, Teacher(student, cfg.consistency.teacher), optimizer, steps, n_steps, cfg,
                       lambda_=noise_variance(0.0, cfg.consistency.eps), streams=RandomStreams(0))
    return {"wall_s": time.perf_counter() - t0, "steps": int(stats["steps"]), "patches": int(stats["patches"])}


def wait_frac(wait_s: float, first_wait_s: float, epoch_s: float) -> float:
    """``train_worker._stream_stats``' data_wait_frac: waiting after the first step over the epoch after it."""
    return (wait_s - first_wait_s) / max(epoch_s - first_wait_s, 1e-9)


def start_ray(need_cpus: float) -> str:
    """A local Ray instance as ``cssl_ray.distributed.ray_init.init_ray`` starts it; returns its temp folder."""
    import ray
    import ray.data

    tmp = tempfile.mkdtemp(prefix="cssl_bench_", dir="/tmp")  # short: Ray's unix socket paths
    os.environ.update({"RAY_TMPDIR": tmp, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"})
    ray.init(num_cpus=max(os.cpu_count() or 1, math.ceil(need_cpus) + 1), include_dashboard=False,
             log_to_driver=False)
    import logging

    logging.getLogger("ray.data").setLevel(logging.WARNING)  # two INFO lines per stream execution
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.execution_options.preserve_order = True
    return tmp


def ray_run(cfg: Config, images: int, labellers: int, out: str) -> list[dict[str, Any]]:
    """A real 1-worker ``run_ray`` of 2 rounds on the benchmark's geometry: its round records."""
    from cssl_ray.config import from_dict
    from cssl_ray.distributed.ray_train import run_ray
    from cssl_ray.distributed.stream import StreamResources

    d = to_dict(cfg)
    d["data"].update({"name": "synthetic", "n_train": images, "n_val": 2, "n_test": 2, "labelled_fraction": 0.1})
    d["train"].update({"stage_a_steps": 2, "max_rounds": 2, "progress": False, "num_threads": 1, "out_dir": out,
                       "figures": False})
    result = run_ray(from_dict(d), workers=1, resources=StreamResources(labellers=labellers))
    keys = ("round", "steps", "data_wait_frac", "first_step_wait_s", "patch_wait_s", "epoch_s", "patches_per_s")
    return [{k: h[k] for k in keys if k in h} for h in result.history if h["stage"] == "round"]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    cfg = resolve_config(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]  # other processes' demand, read before ours starts
    d = cfg.data
    torch.manual_seed(0)
    images, masks = make_synthetic(args.images, tuple(d.image_size), d.num_classes, seed=0, difficulty=d.difficulty,
                                   in_channels=d.in_channels)
    n_l = min(max(1, round(args.labelled * args.images)), args.images - 1)
    l_img, l_mask, u_img, u_mask = images[:n_l], masks[:n_l], images[n_l:], masks[n_l:]
    model = create_model(cfg.model, d.in_channels, d.num_classes)
    pretrain(model, images, masks, cfg, args.pretrain_steps)
    model.eval()
    plan = epoch_plan(u_img.shape[0], cfg, RandomStreams(0))
    # What the stream's tasks read D_U from (as in a run): the same synthetic images, made by index
    source = DataSource(dataclasses.replace(d, seed=0), None, Split(list(range(n_l)), list(range(n_l, args.images)), [], []),
                        class_names(d.num_classes))

    # The trainer alone: the epoch's steps prepared in memory (--local's path).
    t0 = time.perf_counter()
    pseudo, pstats = label_round(model, cfg, u_img, hidden_masks=u_mask)
    label_s = time.perf_counter() - t0
    prepared = list(local_steps(cfg, 1, plan, u_img, pseudo, l_img, l_mask))
    if not any(s.patches.shape[0] for s in prepared):
        raise SystemExit(f"patch_stream: no class-wise patches of {cfg.patches.size} px in {args.images} images; "
                         "raise --images or --pretrain-steps")
    consume = epoch(model, cfg, prepared, len(plan))
    consume["steps_per_s"] = consume["steps"] / consume["wall_s"]

    import ray

    from cssl_ray.distributed.stream import LabellerPool, RankSteps, StreamResources
    from cssl_ray.distributed.weights import get_or_create_weight_store, publish_weights

    most = max(args.labellers)
    base = StreamResources(labellers=most)
    tmp = start_ray(most * base.labeller_cpus + base.samplers * base.sampler_cpus + 1)
    streams: dict[str, Any] = {}
    try:
        store_name = f"bench_weights_{uuid.uuid4().hex[:8]}"
        store = get_or_create_weight_store(store_name)
        publish_weights(store, model, version=1)
        for n in args.labellers:
            res = StreamResources(labellers=n)
            with LabellerPool(cfg, store_name, res) as pool:
                def rank_steps() -> RankSteps:
                    return RankSteps(cfg, 1, plan, rank=0, world=1, source=source, labelled_images=l_img,
                                     labelled_masks=l_mask, actors=pool.actors, resources=res)
                warm = rank_steps()
                for _ in warm:  # the labellers' start (process, torch import, model) is not a round's cost
                    pass
                alone = rank_steps()
                t0 = time.perf_counter()
                n_steps = sum(1 for _ in alone)
                wall = time.perf_counter() - t0
                after = max(wall - alone.first_wait_s, 1e-9)
                fed = rank_steps()
                trained = epoch(model, cfg, fed, len(plan))
                streams[str(n)] = {
                    "steps": n_steps, "wall_s": wall, "first_step_s": alone.first_wait_s,
                    "steps_per_s": (n_steps - 1) / after if n_steps > 1 else float("nan"),
                    "ratio": ((n_steps - 1) / after) / consume["steps_per_s"] if n_steps > 1 else float("nan"),
                    "pseudo_coverage": alone.counts["pseudo_covered"] / max(alone.counts["pseudo_pixels"], 1),
                    "streamed": {**trained, "wait_s": fed.wait_s, "first_wait_s": fed.first_wait_s,
                                 "data_wait_frac": wait_frac(fed.wait_s, fed.first_wait_s, trained["wall_s"])}}
        ray.kill(store)
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    in_run = None
    if args.ray_run:
        with tempfile.TemporaryDirectory(prefix="cssl_bench_run_") as out:
            in_run = ray_run(cfg, args.images, args.labellers[0], out)

    result = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                    "torch": torch.__version__, "ray": ray.__version__, "threads": torch.get_num_threads(),
                    "load_average": load},
        "config": {"smoke": args.smoke, "config": args.config, "images": args.images, "labelled": n_l,
                   "image_size": list(d.image_size), "model": to_dict(cfg)["model"], "patch_size": cfg.patches.size,
                   "per_image": cfg.patches.per_image, "batch_patches": cfg.patches.batch_size,
                   "unlabelled_batch": cfg.consistency.batch_size, "steps": len(plan),
                   "pretrain_steps": args.pretrain_steps, "labellers": args.labellers},
        "labelling_in_process": {"wall_s": label_s, **pstats}, "consumption": consume, "stream": streams,
        "ray_run": in_run,
        "targets": {"ratio": TARGET_RATIO, "data_wait_frac": TARGET_WAIT},
        "pass": {n: {"ratio": s["ratio"] >= TARGET_RATIO, "data_wait_frac": s["streamed"]["data_wait_frac"] < TARGET_WAIT}
                 for n, s in streams.items()},
    }
    report(result)
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.json}")
    return result


def report(r: dict[str, Any]) -> None:
    """The table of ``main``'s result."""
    c, m, cons = r["config"], r["machine"], r["consumption"]
    ok = lambda cond: "PASS" if cond else "FAIL"  # noqa: E731
    print(f"labelling stream on {m['cpu']} ({m['cpu_count']} cores), torch {m['torch']}, ray {m['ray']}; "
          f"{c['images']} images {c['image_size'][0]}x{c['image_size'][1]} ({c['labelled']} labelled), "
          f"{c['steps']} L_tot steps of {c['unlabelled_batch']} images, {c['patch_size']} px patches, "
          f"L_CL batch {c['batch_patches']}, trainer {m['threads']} thread(s)")
    print(f"trainer alone (steps in memory): {cons['steps_per_s']:.2f} steps/s ({cons['steps']} steps, "
          f"{cons['wall_s']:.2f} s; labelling D_U in process took {r['labelling_in_process']['wall_s']:.2f} s)")
    print(f"{'labellers':>9}{'first step s':>14}{'steps/s':>10}{'ratio':>8}{'':6}{'data-wait':>10}{'':6}")
    for n, s in r["stream"].items():
        st = s["streamed"]
        print(f"{n:>9}{s['first_step_s']:14.2f}{s['steps_per_s']:10.2f}{s['ratio']:8.2f} {ok(r['pass'][n]['ratio']):5}"
              f"{100 * st['data_wait_frac']:9.1f}% {ok(r['pass'][n]['data_wait_frac']):5}"
              f"  (streamed epoch {st['wall_s']:.2f} s, first step waited {st['first_wait_s']:.2f} s)")
    print(f"targets: stream >= {r['targets']['ratio']:.0f}x the trainer's steps/s; data-wait after the first step "
          f"< {100 * r['targets']['data_wait_frac']:.0f}% of the epoch")
    if r["ray_run"]:
        for h in r["ray_run"]:
            print(f"ray_train run, round {h['round']}: data_wait_frac {100 * h.get('data_wait_frac', float('nan')):.1f}%, "
                  f"first step waited {h.get('first_step_wait_s', float('nan')):.2f} s, epoch {h.get('epoch_s', float('nan')):.2f} s")
    if (m["cpu_count"] or 1) <= 2:
        print(f"note: {m['cpu_count']} cores: in the streamed epoch the labellers, the stream's tasks and the trainer "
              "share them; the stream-alone and trainer-alone rates each had the machine to itself")
    if m["load_average"] > max((m["cpu_count"] or 1) - m["threads"], 0) + 0.5:
        print(f"note: load average {m['load_average']:.1f} before the run on {m['cpu_count']} cores: other processes "
              "compete for the cores and distort these timings; rerun when idle")


if __name__ == "__main__":
    main(sys.argv[1:])
