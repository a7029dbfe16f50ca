"""Benchmark: the Ray Data patch stream against the trainer that consumes it (DESIGN.md section 5).

    python benchmarks/patch_stream.py [--images 512] [--size 96] [--labellers 1] [--threads 1]
                                      [--repeats 10] [--json benchmarks/results/patch_stream.json] [--smoke]
                                      [--per-execution-baseline]

Workload: the demo's geometry (configs/demo_synthetic.yaml: attention U-Net base 8 depth 3, 32 px
patches, 2 windows per class per image, L_CL batches of 96 patches, L_CR batches of 8 images) over
``--images`` synthetic images of ``--size`` px, 10% of them labelled (D_L, ground truth) and the
rest unlabelled (D_U, pseudo-labelled by the stream). A random model pseudo-labels nothing at the
0.9 threshold, so the model first takes ``--pretrain-steps`` supervised Adam steps on the images'
masks; the coverage it reaches is reported (it sets how many D_U patches there are).

Figures, all from one run in one process (one Ray instance, one model):
  stream       ``pipeline.build_patch_stream`` with a ``LabellerPool`` (long-lived PseudoLabeller
               actors, as ``ray_train`` runs it -> patch-sampling tasks, the labelled branch unioned
               in), one warm-up execution (it waits for the actors' start), then one full pass
               (``iter_batches``, nothing else running) = one later round in ``ray_train``:
               patches / wall time of the pass; time to the first batch is shown apart. Also the
               stream's pseudo-label coverage / accuracy (its stats rows) next to the reference's.
  per-execution  with ``--per-execution-baseline``: the same stream without a pool (a Ray Data
               actor pool, started afresh on every execution: the design before the LabellerPool),
               its own warm-up and full pass, in the same run for a like-for-like comparison.
  consumption  the trainer's L_tot step (``cssl_objective`` forward + backward + Adam, BatchNorm
               statistics frozen as in ``loop.cssl_epoch``) on class-balanced batches of
               ``patches.batch_size`` patches plus a ``consistency.batch_size`` L_CR batch, same
               model, in this process: batch size / median step time.
  ratio        stream / consumption (target >= 2).
  data-wait    the trainer consuming the stream directly: ``iter_torch_batches(batch_size=P,
               local_shuffle_buffer_size=shuffle_buffer_size(cfg))`` and one step per batch;
               time blocked in the iterator / total (target < 5%); also without the first batch
               (the pool's start) to show the steady state.
  reference    ``loop.round_patches`` in this process (``--local``'s steps B + C): patches/s.
  collect-first  ``ray_train`` does not step while it streams: each rank collects its whole shard
               first (for a reproducible, class-balanced order), then trains. Its wait share is
               pass time / (pass time + steps for those patches at the measured step time).

On a 2-core machine the stream's actors and tasks and the trainer share the same 2 cores: the
stream-alone and step-alone rates are each measured with the machine to themselves, the data-wait
run has both competing. ``--threads`` (default 1) is the trainer's torch threads: with the stream's
processes on the other core, a second thread only waits for a descheduled one (measured in
benchmarks/contrastive_loss.py). Ray starts as ``cssl_ray.ray_init.init_ray`` does (RAY_TMPDIR under
/tmp, usage stats off, token auth off, logical CPUs over-subscribed to cover every stage).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from cssl_ray.config import Config, ConfigError, load_config, merge, to_dict
from cssl_ray.consistency import Teacher, noise_variance
from cssl_ray.streams import RandomStreams
from cssl_ray.data.synthetic import make_synthetic
from cssl_ray.loop import frozen_norm_statistics, round_patches
from cssl_ray.models import check_geometry, create_model
from cssl_ray.objective import StepInputs, cssl_objective
from cssl_ray.patches import class_balanced_batches

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
    ap.add_argument("--images", type=int, default=512, help="synthetic images in the stream (D_L + D_U)")
    ap.add_argument("--size", type=int, default=96, help="image height and width, px")
    ap.add_argument("--labelled", type=float, default=0.1, help="fraction of the images in D_L (ground truth)")
    ap.add_argument("--labellers", type=int, default=1, help="PseudoLabeller actors (StreamResources.labellers)")
    ap.add_argument("--threads", type=int, default=1, help="the trainer's torch threads (0 = torch's default)")
    ap.add_argument("--repeats", type=int, default=10, help="timed L_tot steps (median reported)")
    ap.add_argument("--pretrain-steps", type=int, default=150, help="supervised steps before labelling")
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "patch_stream.json"))
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, seconds of compute (plus Ray's start)")
    ap.add_argument("--per-execution-baseline", action="store_true",
                    help="also time the stream with a fresh Ray Data labeller pool per execution (the old design)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.images, args.size, args.repeats, args.pretrain_steps = 12, 32, 2, 20
    if args.images < 2:
        raise SystemExit(f"patch_stream: --images {args.images}; allowed: >= 2")
    if args.labellers < 1:
        raise SystemExit(f"patch_stream: --labellers {args.labellers}; allowed: >= 1")
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


class Trainer:
    """The L_tot step of ``loop.cssl_epoch`` (without its per-step omega), on a copy of ``model``."""

    def __init__(self, model: torch.nn.Module, cfg: Config, unlabelled: torch.Tensor) -> None:
        import copy

        self.cfg = cfg
        self.model = copy.deepcopy(model).train()  # steps must not move the weights being labelled with
        self.teacher = Teacher(self.model, cfg.consistency.teacher)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.optim.lr)
        self.unlabelled = unlabelled[:cfg.consistency.batch_size]  # (B, C_in, H, W)
        self.lambda_ = noise_variance(0.0, cfg.consistency.eps)
        self.streams = RandomStreams(0)

    def step(self, patches: torch.Tensor, classes: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        with frozen_norm_statistics(self.model):
            out = cssl_objective(self.model, self.teacher, StepInputs(patches, classes, self.unlabelled), self.cfg,
                                 lambda_=self.lambda_, streams=self.streams)
            out["loss"].backward()
        self.optimizer.step()


def consumption(trainer: Trainer, patches: torch.Tensor, classes: torch.Tensor, repeats: int) -> dict[str, Any]:
    """Median L_tot step time on class-balanced batches of ``patches.batch_size`` patches."""
    p = trainer.cfg.patches.batch_size
    g = torch.Generator().manual_seed(1)
    batches = class_balanced_batches(classes, p, num_batches=repeats + 2, generator=g)
    times = []
    for i, idx in enumerate(batches):
        idx = idx.repeat(math.ceil(p / idx.numel()))[:p]  # too few patches: reuse, as train_step does
        t0 = time.perf_counter()
        trainer.step(patches[idx], classes[idx])
        if i >= 2:  # two warm-up steps
            times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return {"batch_patches": p, "step_median_s": med, "step_times_s": times, "patches_per_s": p / med}


def stream_pass(ds: Any) -> dict[str, Any]:
    """One full execution of the stream, nothing else running: patches (stats rows apart), wall time,
    first batch, and the pseudo-label coverage / accuracy summed from the stats rows."""
    from cssl_ray.pipeline import COUNT_COLUMNS, pseudo_stats, split_stats_rows

    t0 = time.perf_counter()
    first, n, n_first, rows = None, 0, 0, 0
    counts = dict.fromkeys(COUNT_COLUMNS, 0)
    for batch in ds.iter_batches(batch_size=256, batch_format="numpy"):
        rows += len(batch["patch_class"])
        patch_rows, c = split_stats_rows(batch)
        n += len(patch_rows["patch_class"])
        counts = {k: counts[k] + c[k] for k in COUNT_COLUMNS}
        if first is None:
            first, n_first = time.perf_counter() - t0, n
    wall = time.perf_counter() - t0
    after = wall - (first or 0.0)
    return {"patches": n, "rows": rows, "wall_s": wall, "first_batch_s": first, "patches_per_s": n / wall,
            # after the first batch: the pool is up, this is the rate a longer pass tends to
            "steady_patches_per_s": (n - n_first) / after if after > 0 and n > n_first else float("nan"),
            **pseudo_stats(counts, with_accuracy=True)}


def streamed_training(ds: Any, trainer: Trainer, buffer: int) -> dict[str, Any]:
    """The trainer iterating the stream directly, one L_tot step per batch (on its patch rows; the D_U
    stats rows take a few slots): time blocked in the iterator."""
    from cssl_ray.pipeline import split_stats_rows

    p = trainer.cfg.patches.batch_size
    it = iter(ds.iter_torch_batches(batch_size=p, local_shuffle_buffer_size=buffer))
    waits, steps, batches = [], [], 0
    t_start = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            waits.append(time.perf_counter() - t0)  # draining the end of the stream is waiting too
            break
        t1 = time.perf_counter()
        batches += 1
        batch, _ = split_stats_rows(batch)
        if len(batch["patch_class"]):
            trainer.step(batch["patch"].float(), batch["patch_class"].long())
            steps.append(time.perf_counter() - t1)
        waits.append(t1 - t0)
    total = time.perf_counter() - t_start
    wait = sum(waits)
    later_wait = sum(waits[1:])
    later_total = total - waits[0]
    return {"steps": len(steps), "batches": batches, "total_s": total, "wait_s": wait, "step_s": sum(steps),
            "first_wait_s": waits[0], "wait_share": wait / total,
            "wait_share_after_first": later_wait / later_total if later_total > 0 else float("nan"),
            "step_median_s": statistics.median(steps) if steps else float("nan")}


def start_ray(need_cpus: float) -> str:
    """A local Ray instance as ``cssl_ray.ray_init.init_ray`` starts it; returns its temp folder."""
    import ray
    import ray.data

    tmp = tempfile.mkdtemp(prefix="cssl_bench_", dir="/tmp")  # short: Ray's unix socket paths
    os.environ.update({"RAY_TMPDIR": tmp, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"})
    ray.init(num_cpus=max(os.cpu_count() or 1, math.ceil(need_cpus) + 1), include_dashboard=False,
             log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    return tmp


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    cfg = resolve_config(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]  # other processes' demand, read before ours starts
    d, pt = cfg.data, cfg.patches
    torch.manual_seed(0)
    images, masks = make_synthetic(args.images, tuple(d.image_size), d.num_classes, seed=0, difficulty=d.difficulty,
                                   in_channels=d.in_channels)
    n_l = min(max(1, round(args.labelled * args.images)), args.images - 1)
    l_img, l_mask, u_img, u_mask = images[:n_l], masks[:n_l], images[n_l:], masks[n_l:]
    model = create_model(cfg.model, d.in_channels, d.num_classes)
    pretrain(model, images, masks, cfg, args.pretrain_steps)
    model.eval()

    # Reference: the single-process steps B + C (--local), then the trainer's consumption rate.
    t0 = time.perf_counter()
    patches, classes, ref_stats = round_patches(model, cfg, l_img, l_mask, u_img, generator=torch.Generator().manual_seed(0),
                                                hidden_masks=u_mask)
    ref_s = time.perf_counter() - t0
    if patches.shape[0] == 0:
        raise SystemExit(f"patch_stream: no class-wise patches of {pt.size} px in {args.images} images; "
                         "raise --images or --pretrain-steps")
    reference = {**ref_stats, "patches": int(patches.shape[0]), "wall_s": ref_s,
                 "patches_per_s": patches.shape[0] / ref_s}
    consume = consumption(Trainer(model, cfg, u_img), patches, classes, args.repeats)

    import ray

    from cssl_ray.pipeline import LabellerPool, StreamResources, build_patch_stream, image_rows, shuffle_buffer_size
    from cssl_ray.weights import get_or_create_weight_store, publish_weights

    res = StreamResources(labellers=args.labellers)
    pools = 2 if args.per_execution_baseline else 1  # the baseline's pool runs beside the persistent one
    tmp = start_ray(pools * res.labellers * res.labeller_cpus + 2 * res.samplers * res.sampler_cpus)
    per_execution = None
    try:
        store_name = f"bench_weights_{uuid.uuid4().hex[:8]}"
        store = get_or_create_weight_store(store_name)
        publish_weights(store, model, version=1)
        u_rows, l_rows = image_rows(u_img, hidden=u_mask), image_rows(l_img, l_mask)
        with LabellerPool(cfg, store_name, res) as labellers:
            ds = build_patch_stream(cfg, u_rows, l_rows, store_name=store_name, resources=res, labellers=labellers)
            warmup = stream_pass(ds)
            stream = stream_pass(ds)
            if args.per_execution_baseline:
                old = build_patch_stream(cfg, u_rows, l_rows, store_name=store_name, resources=res)
                per_execution = {"stream_warmup": stream_pass(old), "stream": stream_pass(old)}
            streamed = streamed_training(ds, Trainer(model, cfg, u_img), shuffle_buffer_size(cfg))
        ray.kill(store)
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)

    ratio = stream["patches_per_s"] / consume["patches_per_s"]
    ratio_steady = stream["steady_patches_per_s"] / consume["patches_per_s"]
    steps_for_pass = stream["patches"] / pt.batch_size
    collect_first = stream["wall_s"] / (stream["wall_s"] + steps_for_pass * consume["step_median_s"])
    result = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                    "torch": torch.__version__, "ray": ray.__version__, "threads": torch.get_num_threads(),
                    "load_average": load},
        "config": {"smoke": args.smoke, "config": args.config, "images": args.images, "labelled": n_l,
                   "image_size": list(d.image_size), "model": to_dict(cfg)["model"],
                   "patch_size": pt.size, "per_image": pt.per_image,
                   "batch_patches": pt.batch_size, "unlabelled_batch": cfg.consistency.batch_size,
                   "pretrain_steps": args.pretrain_steps, "repeats": args.repeats,
                   "resources": dataclasses.asdict(res),
                   "shuffle_buffer": shuffle_buffer_size(cfg)},
        "reference_round_patches": reference, "consumption": consume, "stream_warmup": warmup, "stream": stream,
        "ratio": ratio, "ratio_steady": ratio_steady, "streamed_training": streamed, "collect_first_wait_share": collect_first,
        "per_execution_baseline": per_execution,
        "targets": {"ratio": TARGET_RATIO, "wait_share": TARGET_WAIT},
        "pass": {"ratio": ratio >= TARGET_RATIO, "wait_share": streamed["wait_share"] < TARGET_WAIT},
    }
    report(result)
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.json}")
    return result


def report(r: dict[str, Any]) -> None:
    """The table of ``main``'s result."""
    c, m = r["config"], r["machine"]
    ok = lambda cond: "PASS" if cond else "FAIL"  # noqa: E731
    print(f"patch stream on {m['cpu']} ({m['cpu_count']} cores), torch {m['torch']}, ray {m['ray']}; "
          f"{c['images']} images {c['image_size'][0]}x{c['image_size'][1]} ({c['labelled']} labelled), "
          f"{c['patch_size']} px patches, L_CL batch {c['batch_patches']}, L_CR batch {c['unlabelled_batch']}, "
          f"trainer {m['threads']} thread(s)")
    ref, s, w, cons, st = (r["reference_round_patches"], r["stream"], r["stream_warmup"], r["consumption"],
                           r["streamed_training"])
    print(f"{'':40}{'patches':>9}{'wall s':>9}{'patches/s':>11}")
    print(f"{'round_patches, one process (ref.)':40}{ref['patches']:9d}{ref['wall_s']:9.2f}{ref['patches_per_s']:11.1f}")
    print(f"{'Ray Data stream, warm-up execution':40}{w['patches']:9d}{w['wall_s']:9.2f}{w['patches_per_s']:11.1f}")
    print(f"{'Ray Data stream, full pass':40}{s['patches']:9d}{s['wall_s']:9.2f}{s['patches_per_s']:11.1f}"
          f"   (first batch after {s['first_batch_s']:.2f} s; after it {s['steady_patches_per_s']:.1f} patches/s)")
    if r["per_execution_baseline"]:
        b = r["per_execution_baseline"]["stream"]
        print(f"{'  baseline: fresh labeller pool per pass':40}{b['patches']:9d}{b['wall_s']:9.2f}"
              f"{b['patches_per_s']:11.1f}"
              f"   (first batch after {b['first_batch_s']:.2f} s)")
    print(f"{'trainer L_tot step (consumption)':40}{cons['batch_patches']:9d}{cons['step_median_s']:9.3f}"
          f"{cons['patches_per_s']:11.1f}   (median of {len(cons['step_times_s'])} steps)")
    print(f"stream / consumption  {r['ratio']:6.2f}x   target >= {r['targets']['ratio']:.0f}x   "
          f"{ok(r['pass']['ratio'])}   (after the first batch: {r['ratio_steady']:.2f}x)")
    print(f"data-wait, trainer on the stream: {100 * st['wait_share']:.1f}% of {st['total_s']:.2f} s "
          f"({st['steps']} steps, median step {st['step_median_s'] * 1e3:.0f} ms; first batch {st['first_wait_s']:.2f} s; "
          f"after it {100 * st['wait_share_after_first']:.1f}%)   target < {100 * r['targets']['wait_share']:.0f}%   "
          f"{ok(r['pass']['wait_share'])}")
    print(f"collect-first (as ray_train does today): wait share {100 * r['collect_first_wait_share']:.1f}%")
    if "pseudo_coverage" in ref:
        print(f"pseudo-label coverage {100 * ref['pseudo_coverage']:.1f}%, accuracy on covered pixels "
              f"{100 * ref.get('pseudo_accuracy', float('nan')):.1f}% (stream's stats rows: "
              f"{100 * s['pseudo_coverage']:.1f}%, {100 * s['pseudo_accuracy']:.1f}%)")
    if (m["cpu_count"] or 1) <= 2:
        print(f"note: {m['cpu_count']} cores: in the data-wait run the stream's labeller and samplers and the trainer "
              "share them, and each stream-alone / step-alone rate above had the machine to itself")
    busy = m["load_average"] > max((m["cpu_count"] or 1) - m["threads"], 0) + 0.5
    if busy:
        print(f"note: load average {m['load_average']:.1f} before the run on {m['cpu_count']} cores: other processes "
              "compete for the cores and distort these timings; rerun when idle")


if __name__ == "__main__":
    main(sys.argv[1:])
