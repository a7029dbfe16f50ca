"""Benchmark: achieved FLOP/s of one full CSSL step vs this machine's fp32 matmul (DESIGN.md section 5).

    python benchmarks/train_step.py [--preset cpu|paper] [--config YAML] [--threads N] [--repeats 10]
                                    [--profile] [--json benchmarks/results/train_step.json] [--smoke]

The step is what ``cssl_ray.run.loop.cssl_epoch`` does per patch batch: ``cssl_objective`` (L_CL on a
class-balanced batch of masked class-wise patches drawn by ``sample_patches`` from synthetic images,
plus L_CR on a batch of unlabelled images against the "previous" teacher) forward, backward and an
Adam step, with BatchNorm statistics frozen as in the loop. Not in the step: the loop's per-step
silhouette (omega) and its ``float(loss)`` reads. A supervised step (cross-entropy on a labelled
batch at full image size) is timed the same way for reference.

Geometry comes from a preset (config overrides, below), or from a run config (``--config``), then
from the flags. ``cpu``: the demo's geometry (96 px images, 32 px patches, 8 unlabelled images) at
base width 32 and depth 4, ~0.75 s a step on 2 cores. ``paper``: base 64, depth 4, 816 patches of
64 px, 8 unlabelled images of 256 x 320 (the GPU default).

FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` over one step's forward + backward. It counts
matrix multiplies and convolutions (transposed ones too, and both halves of their backward) at 2
FLOPs per multiply-add, including the teacher's no-grad decoder pass and L_CL's z @ z.T. It does not
count elementwise work: BatchNorm, ReLU / sigmoid, the attention gates' products, max-pooling,
concatenation, softmax / log-sum-exp / normalisation in the losses, the noise draw, or the Adam
update. Those take time without adding FLOPs, so the achieved figure is a rate of useful FLOPs:
counted FLOPs / median step time.

Reference: fp32 matmul (n x n @ n x n, 2 n^3 FLOPs, median of repeats) in this process at the same
thread count, measured before and after the steps; the higher of the two is the reference, so a
machine slowed by other processes does not flatter the ratio. Target: ratio >= 0.5. Conv
reference: a bias-free 3x3 conv (w_l -> w_l) forward + backward (input and weight gradients) at
each level's width and resolution for the unlabelled batch, alone and followed by BN + ReLU, to
show whether a gap is the model's shapes (narrow, high-resolution convs) or the layers around them.

CUDA (when present): the fp32 step (TF32 off for convs and matmuls, so fp32 means fp32) against the
fp32 matmul; then the same step under bf16 autocast with the model and inputs channels_last,
against a bf16 matmul measured the same way (n = --peak-size); images/s and % of that peak.
Every timing is synchronised. ``--profile`` runs torch.profiler over two steps and prints where
the time goes, by op category and top ops.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from cssl_ray.config import Config, ConfigError, from_dict, load_config, merge
from cssl_ray.data.synthetic import make_synthetic
from cssl_ray.method.consistency import Teacher, noise_variance
from cssl_ray.method.objective import StepInputs, Terms, cssl_objective
from cssl_ray.method.patches import class_balanced_batches, sample_patches
from cssl_ray.method.streams import RandomStreams
from cssl_ray.models import check_geometry, create_model
from cssl_ray.models.precision import Precision, backward_step
from cssl_ray.run.loop import frozen_norm_statistics

TARGET_RATIO = 0.5
PRESETS: dict[str, dict[str, Any]] = {
    "paper": {"model": {"base_channels": 64, "depth": 4}, "data": {"image_size": [256, 320]},
              "patches": {"size": 64, "batch_size": 816}, "consistency": {"batch_size": 8},
              "train": {"batch_size": 16}},
    "cpu": {"model": {"base_channels": 32, "depth": 4}, "data": {"image_size": [96, 96]},
            "patches": {"size": 32, "batch_size": 128}, "consistency": {"batch_size": 8},
            "train": {"batch_size": 8}},
    "smoke": {"model": {"base_channels": 4, "depth": 2, "embed_dim": 16, "proj_hidden": 16},
              "data": {"image_size": [32, 32]}, "patches": {"size": 16, "min_pixels": 10, "batch_size": 12},
              "consistency": {"batch_size": 2}, "train": {"batch_size": 2}},
}
# Op-name fragments -> category of the profile table (first match wins; names without "aten::"
# are the autograd engine's and record_function's own time).
CATEGORIES = (("optimizer", ("_foreach", "optimizer", "adam")), ("conv", ("conv", "fprop", "dgrad", "wgrad")),
              ("matmul", ("aten::mm", "addmm", "bmm", "linear", "matmul", "gemm")),
              ("batch norm", ("batch_norm", "bn_")), ("relu / sigmoid", ("relu", "clamp_min", "threshold", "sigmoid")),
              ("max-pool", ("pool",)))


@dataclasses.dataclass
class Workload:
    """Everything one step touches, on one device. ``cfg_cl`` / ``cfg_cr`` switch off the other loss."""

    cfg: Config
    model: nn.Module
    teacher: Teacher
    optimizer: torch.optim.Optimizer
    inputs: StepInputs  # patches (P, C_in, s, s), classes (P,), unlabelled (B, C_in, H, W)
    labelled: tuple[Tensor, Tensor]  # (B_sup, C_in, H, W), (B_sup, H, W) for the supervised step
    lambda_: float
    streams: RandomStreams  # on the CPU, as in the loop: the noise is drawn there and moved
    precision: Precision  # the trainer's train.amp / train.channels_last

    @property
    def cfg_cl(self) -> Config:
        return dataclasses.replace(self.cfg, train=dataclasses.replace(self.cfg.train, use_cr=False))

    @property
    def cfg_cr(self) -> Config:
        return dataclasses.replace(self.cfg, train=dataclasses.replace(self.cfg.train, use_cl=False))


def make_batches(cfg: Config, seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """CPU tensors: a class-balanced patch batch (P, C_in, s, s) and its classes (P,), unlabelled
    images (B, C_in, H, W), labelled images and masks for the supervised step."""
    d, pt = cfg.data, cfg.patches
    per_image = pt.per_image
    n = max(math.ceil(pt.batch_size / per_image) + 2, cfg.consistency.batch_size, cfg.train.batch_size)
    images, masks = make_synthetic(n, d.image_size, d.num_classes, seed=seed, difficulty=d.difficulty,
                                   in_channels=d.in_channels)
    g = torch.Generator().manual_seed(seed)
    patches, classes, _ = sample_patches(images, masks, pt.size, pt.min_pixels, per_image=per_image,
                                         mask=pt.mask, classes=range(1, d.num_classes),
                                         ignore_index=cfg.pseudo.ignore_index, generator=g)
    if patches.shape[0] == 0:
        raise SystemExit(f"train_step: no class-wise patches of {pt.size} px with >= {pt.min_pixels} class pixels "
                         f"in {n} synthetic images of {list(d.image_size)}; lower patches.min_pixels")
    idx = class_balanced_batches(classes, pt.batch_size, num_batches=1, generator=g)[0]
    idx = idx.repeat(math.ceil(pt.batch_size / idx.numel()))[:pt.batch_size]  # too few windows: reuse
    b, s = cfg.consistency.batch_size, cfg.train.batch_size
    return patches[idx], classes[idx], images[:b], images[:s], masks[:s]


def build(cfg: Config, device: torch.device, data: tuple[Tensor, ...], *, bf16: bool = False) -> Workload:
    """Fresh model (seed 0), teacher and Adam; bf16 = the trainer's ``train.amp: bf16`` with
    ``train.channels_last``, as ``RunState`` and the loops apply them (``cssl_ray.models.precision``)."""
    torch.manual_seed(0)
    prec = Precision("bf16" if bf16 else "off", device.type, channels_last=bf16)
    model = prec.prepare_model(create_model(cfg.model, cfg.data.in_channels, cfg.data.num_classes).to(device))
    model.train()
    teacher = Teacher(model, "previous")  # deep copy: channels_last too
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.optim.lr)
    patches, classes, unlabelled, x_sup, y_sup = (t.to(device) for t in data)
    patches, unlabelled, x_sup = (prec.layout(t) for t in (patches, unlabelled, x_sup))
    return Workload(cfg, model, teacher, optimizer, StepInputs(patches, classes, unlabelled), (x_sup, y_sup),
                    noise_variance(0.0, cfg.consistency.eps), RandomStreams(0), prec)


def objective(w: Workload, cfg: Config | None = None) -> Tensor:
    """L_tot (or one part of it, through ``cfg``), forward under the workload's precision."""
    with w.precision.autocast():
        out = cssl_objective(w.model, w.teacher, w.inputs, Terms.of(cfg or w.cfg), lambda_=w.lambda_, streams=w.streams)
    return out["loss"]


def forward_backward(w: Workload, cfg: Config | None = None) -> None:
    """L_tot (or one part of it) forward and backward; fresh gradients, no step (FLOP counts)."""
    w.optimizer.zero_grad(set_to_none=True)
    objective(w, cfg).backward()


def cssl_step(w: Workload) -> None:
    """As ``loop.cssl_epoch`` steps (one process: no gradient all-reduce)."""
    backward_step(objective(w), w.optimizer)


def supervised_step(w: Workload, optimise: bool = True) -> None:
    """As ``loop.supervised_epoch`` steps: the forward under autocast, the loss in fp32."""
    x, y = w.labelled
    with w.precision.autocast():
        logits = w.model(x)  # (B, C, H, W)
    loss = F.cross_entropy(logits.float(), y, ignore_index=w.cfg.pseudo.ignore_index)
    if optimise:
        backward_step(loss, w.optimizer)
    else:
        w.optimizer.zero_grad(set_to_none=True)
        loss.backward()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], repeats: int, warmup: int, device: torch.device) -> list[float]:
    """Wall seconds of ``repeats`` synchronised calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def summary(times: list[float], flops: int) -> dict[str, Any]:
    med = statistics.median(times)
    q = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else [med] * 9
    return {"median_s": med, "p10_s": q[0], "p90_s": q[-1], "times_s": times, "flops": flops,
            "gflops_per_s": flops / med / 1e9}


def count_flops(fn: Callable[[], Any]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def matmul_gflops(n: int, dtype: torch.dtype, device: torch.device, repeats: int) -> float:
    """2 n^3 / median time of an (n, n) @ (n, n) product."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    return 2 * n**3 / statistics.median(timed(lambda: torch.mm(a, b), repeats, 2, device)) / 1e9


def step_parts(w: Workload, repeats: int, device: torch.device) -> dict[str, float]:
    """Median seconds of each part of a step, run apart with a sync between parts. The L_CL and
    L_CR graphs share only the parameters, so two backward passes do the work of one on the sum."""
    laps: dict[str, list[float]] = {k: [] for k in ("cl_forward", "cl_backward", "cr_forward", "cr_backward",
                                                    "optimizer")}
    for _ in range(repeats + 1):  # the first round is a warm-up
        sync(device)
        t = time.perf_counter()
        w.optimizer.zero_grad(set_to_none=True)
        for part, cfg in (("cl", w.cfg_cl), ("cr", w.cfg_cr)):
            loss = objective(w, cfg)
            sync(device)
            laps[f"{part}_forward"].append(time.perf_counter() - t)
            t = time.perf_counter()
            loss.backward()
            sync(device)
            laps[f"{part}_backward"].append(time.perf_counter() - t)
            t = time.perf_counter()
        w.optimizer.step()
        sync(device)
        laps["optimizer"].append(time.perf_counter() - t)
    return {k: statistics.median(v[1:]) for k, v in laps.items()}


def conv_reference(cfg: Config, batch: int, device: torch.device, repeats: int) -> list[dict[str, Any]]:
    """3x3 conv (and conv + BN + ReLU) forward + backward at every level of the unlabelled batch."""
    h, w = cfg.data.image_size
    rows = []
    for level in range(cfg.model.depth + 1):
        c, size = cfg.model.base_channels * 2**level, (h >> level, w >> level)
        x = torch.randn(batch, c, *size, device=device, requires_grad=True)
        conv = nn.Conv2d(c, c, 3, padding=1, bias=False).to(device)
        row: dict[str, Any] = {"level": level, "channels": c, "size": list(size)}
        for name, net in (("conv", conv), ("conv_bn_relu", nn.Sequential(conv, nn.BatchNorm2d(c), nn.ReLU()).to(device))):
            grad_out = torch.randn(batch, c, *size, device=device)

            def fb(net: nn.Module = net, grad_out: Tensor = grad_out) -> None:
                x.grad = None
                net.zero_grad(set_to_none=True)
                net(x).backward(grad_out)

            flops = count_flops(fb)
            t = statistics.median(timed(fb, repeats, 1, device))
            row[f"{name}_ms"], row[f"{name}_gflops_per_s"] = t * 1e3, flops / t / 1e9
        rows.append(row)
    return rows


def profile(w: Workload, device: torch.device, steps: int = 2, top: int = 15) -> dict[str, Any]:
    """Self time per op over ``steps`` steps (device time on CUDA), grouped into CATEGORIES."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    cssl_step(w)
    sync(device)
    t0 = time.perf_counter()
    with torch_profile(activities=activities) as prof:
        for _ in range(steps):
            cssl_step(w)
        sync(device)
    wall = (time.perf_counter() - t0) / steps
    cuda = device.type == "cuda"
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    ops = [(e.key, e.count // steps, getattr(e, key, 0) / steps / 1e6) for e in prof.key_averages()]
    ops = sorted((o for o in ops if o[2] > 0), key=lambda o: -o[2])
    cats: dict[str, float] = {}
    # CPU: every op under Optimizer.step is the optimiser's (CPU Adam runs per-tensor aten ops).
    # CUDA: kernel names, matched by the same fragments, so the split there is rough.
    timed_ops = ([(name, False, s) for name, _, s in ops] if cuda else
                 [(e.name, _under_optimizer(e), e.self_cpu_time_total / steps / 1e6) for e in prof.events()])
    for name, in_optimizer, s in timed_ops:
        low = name.lower()
        cat = "optimizer" if in_optimizer else next(
            (c for c, frags in CATEGORIES if any(f in low for f in frags)),
            "other elementwise / copies" if name.startswith("aten::") or cuda else "autograd engine / python")
        cats[cat] = cats.get(cat, 0.0) + s
    return {"wall_s_per_step": wall, "time_kind": key, "categories_s": dict(sorted(cats.items(), key=lambda kv: -kv[1])),
            "top_ops": [{"op": n, "calls": c, "s_per_step": s} for n, c, s in ops[:top]]}


def _under_optimizer(event: Any) -> bool:
    while event is not None:
        if event.name.startswith("Optimizer."):
            return True
        event = event.cpu_parent
    return False


def run_precision(cfg: Config, data: tuple[Tensor, ...], device: torch.device, args: argparse.Namespace, *,
                  bf16: bool) -> dict[str, Any]:
    """Count and time the CSSL step (and its parts, and the supervised step) in one precision."""
    w = build(cfg, device, data, bf16=bf16)
    p, b = cfg.patches.batch_size, cfg.consistency.batch_size
    with frozen_norm_statistics(w.model):  # as in cssl_epoch
        flops = count_flops(lambda: forward_backward(w))
        flops_cl, flops_cr = count_flops(lambda: forward_backward(w, w.cfg_cl)), count_flops(lambda: forward_backward(w, w.cfg_cr))
        step = summary(timed(lambda: cssl_step(w), args.repeats, args.warmup, device), flops)
        parts = step_parts(w, args.repeats, device) if args.breakdown else {}
        prof = profile(w, device) if args.profile else None
    step.update(images_per_s=b / step["median_s"], patches_per_s=p / step["median_s"])
    sup_flops = count_flops(lambda: supervised_step(w, optimise=False))
    sup = summary(timed(lambda: supervised_step(w), args.repeats, args.warmup, device), sup_flops)
    sup["images_per_s"] = cfg.train.batch_size / sup["median_s"]
    return {"step": step, "flops_cl": flops_cl, "flops_cr": flops_cr, "parts_s": parts, "supervised": sup,
            "profile": prof}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), help="geometry; default paper on CUDA, cpu otherwise")
    ap.add_argument("--config", help="take the geometry from this run config (YAML) instead of a preset")
    ap.add_argument("--base-channels", type=int)
    ap.add_argument("--depth", type=int)
    ap.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"))
    ap.add_argument("--patches", type=int, help="patches per L_CL batch")
    ap.add_argument("--patch-size", type=int)
    ap.add_argument("--unlabelled", type=int, help="unlabelled images per L_CR batch")
    ap.add_argument("--sup-batch", type=int, help="labelled images per supervised step")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch's default)")
    ap.add_argument("--repeats", type=int, default=10, help="timed steps (median reported)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--matmul-size", type=int, help="n of the fp32 matmul reference (default 2048, CUDA 8192)")
    ap.add_argument("--peak-size", type=int, default=8192, help="n of the CUDA bf16 matmul peak")
    ap.add_argument("--no-breakdown", dest="breakdown", action="store_false", help="skip the per-part times")
    ap.add_argument("--profile", action="store_true", help="torch.profiler: time by op category")
    ap.add_argument("--json", default="benchmarks/results/train_step.json", help="where to write the figures")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, seconds on a CPU; no targets implied")
    args = ap.parse_args(argv)
    if args.smoke:
        args.preset = args.preset or "smoke"
        args.repeats, args.warmup, args.matmul_size, args.peak_size = 2, 1, 128, 256
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("train_step: --device cuda, but torch sees no CUDA device")
    args.preset = args.preset or ("paper" if args.device == "cuda" else "cpu")
    args.matmul_size = args.matmul_size or (8192 if args.device == "cuda" else 2048)  # >= ~1 ms a product
    return args


def resolve_config(args: argparse.Namespace) -> Config:
    flags = {("model", "base_channels"): args.base_channels, ("model", "depth"): args.depth,
             ("data", "image_size"): args.image_size, ("patches", "batch_size"): args.patches,
             ("patches", "size"): args.patch_size, ("consistency", "batch_size"): args.unlabelled,
             ("train", "batch_size"): args.sup_batch}
    extra: dict[str, Any] = {}
    for (section, key), value in flags.items():
        if value is not None:
            extra.setdefault(section, {})[key] = value
    try:
        cfg = load_config(args.config, extra) if args.config else from_dict(merge(PRESETS[args.preset], extra))
        check_geometry(cfg.model, cfg.data.image_size, cfg.patches.size)
    except ConfigError as e:
        raise SystemExit(f"train_step: {e}") from None
    return cfg


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    cfg = resolve_config(args)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]  # other processes' demand, read before ours starts
    if device.type == "cuda":  # fp32 means fp32: no TF32 in the step nor in its reference
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False

    data = make_batches(cfg)
    mm_before = matmul_gflops(args.matmul_size, torch.float32, device, args.repeats)
    fp32 = run_precision(cfg, data, device, args, bf16=False)
    convs = conv_reference(cfg, cfg.consistency.batch_size, device, max(args.repeats // 2, 2))
    mm_after = matmul_gflops(args.matmul_size, torch.float32, device, args.repeats)
    matmul = max(mm_before, mm_after)
    bf16 = None
    if device.type == "cuda":
        peak = matmul_gflops(args.peak_size, torch.bfloat16, device, args.repeats)
        bf16 = run_precision(cfg, data, device, args, bf16=True)
        bf16.update(bf16_matmul_gflops_per_s=peak, matmul_size=args.peak_size,
                    percent_of_peak=100 * bf16["step"]["gflops_per_s"] / peak)
    ratio = fp32["step"]["gflops_per_s"] / matmul
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    result = {
        "machine": {"device": args.device, "name": name, "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "cpu_count": os.cpu_count(), "load_average": load,
                    "tf32": device.type == "cuda" and torch.backends.cudnn.allow_tf32},
        "config": {"preset": args.preset, "config": args.config, "model": dataclasses.asdict(cfg.model),
                   "image_size": list(cfg.data.image_size), "patches": cfg.patches.batch_size,
                   "patch_size": cfg.patches.size, "unlabelled": cfg.consistency.batch_size,
                   "sup_batch": cfg.train.batch_size, "repeats": args.repeats, "warmup": args.warmup},
        "flops_counted": "matmul and convolution FLOPs (2 per multiply-add) of one forward + backward, "
                         "torch.utils.flop_counter.FlopCounterMode; elementwise ops, norms, pooling and Adam not counted",
        "step": fp32["step"], "flops_cl": fp32["flops_cl"], "flops_cr": fp32["flops_cr"], "parts_s": fp32["parts_s"],
        "supervised": fp32["supervised"],
        "matmul": {"size": args.matmul_size, "gflops_per_s": matmul, "before": mm_before, "after": mm_after},
        "ratio": ratio, "target": TARGET_RATIO, "pass": ratio >= TARGET_RATIO, "conv_reference": convs,
        "profile": fp32["profile"], "cuda_bf16": bf16 and {k: v for k, v in bf16.items() if k != "profile"},
    }
    report(result)
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.json}")
    return result


def report(r: dict[str, Any]) -> None:
    """The table of ``main``'s result."""
    mach, c, step = r["machine"], r["config"], r["step"]
    m, (h, w) = c["model"], c["image_size"]
    print(f"CSSL train step on {mach['device']} ({mach['name']}, {mach['threads']} threads), torch {mach['torch']}, "
          f"preset {c['config'] or c['preset']}")
    print(f"  {m['name']} base {m['base_channels']} depth {m['depth']}; L_CL: {c['patches']} patches "
          f"{c['patch_size']}x{c['patch_size']}; L_CR: {c['unlabelled']} unlabelled {h}x{w}; Adam; median of "
          f"{c['repeats']}; img/s: unlabelled (CSSL) or labelled (supervised) images")
    print(f"{'':28}{'median ms':>10}{'p10':>8}{'p90':>8}{'GFLOP':>9}{'GFLOP/s':>9}{'img/s':>8}")

    def line(label: str, t: dict[str, Any]) -> None:
        print(f"{label:28}{t['median_s'] * 1e3:10.1f}{t['p10_s'] * 1e3:8.1f}{t['p90_s'] * 1e3:8.1f}"
              f"{t['flops'] / 1e9:9.2f}{t['gflops_per_s']:9.1f}{t['images_per_s']:8.1f}")

    line("CSSL step, fp32", step)
    line("supervised step, fp32", r["supervised"])
    mm = r["matmul"]
    print(f"fp32 matmul {mm['size']}^3: {mm['gflops_per_s']:.1f} GFLOP/s (before {mm['before']:.1f}, "
          f"after {mm['after']:.1f})")
    print(f"ratio {r['ratio']:.3f}   target >= {r['target']}   {'PASS' if r['pass'] else 'FAIL'}"
          f"   ({step['patches_per_s']:.0f} patches/s)")
    if r["parts_s"]:
        print("parts (run apart):  " + "  ".join(f"{k} {v * 1e3:.1f} ms" for k, v in r["parts_s"].items())
              + f"  sum {sum(r['parts_s'].values()) * 1e3:.1f} ms")
        for part in ("cl", "cr"):
            secs = r["parts_s"][f"{part}_forward"] + r["parts_s"][f"{part}_backward"]
            flops = r[f"flops_{part}"]
            print(f"  L_{part.upper()} forward+backward: {flops / 1e9:.2f} GFLOP in {secs * 1e3:.1f} ms "
                  f"= {flops / secs / 1e9:.1f} GFLOP/s")
    print("conv reference, 3x3 w->w fwd+bwd, GFLOP/s:  "
          + "  ".join(f"{x['channels']}ch {x['size'][0]}x{x['size'][1]}: {x['conv_gflops_per_s']:.0f} "
                      f"(+BN+ReLU {x['conv_bn_relu_gflops_per_s']:.0f})" for x in r["conv_reference"]))
    if r["profile"]:
        prof = r["profile"]
        total = sum(prof["categories_s"].values())
        print(f"profile ({prof['time_kind']}, per step; wall {prof['wall_s_per_step'] * 1e3:.0f} ms):  "
              + "  ".join(f"{k} {v * 1e3:.0f} ms ({100 * v / total:.0f}%)" for k, v in prof["categories_s"].items()))
        for op in prof["top_ops"]:
            print(f"    {op['op']:<48}{op['calls']:6d} calls {op['s_per_step'] * 1e3:9.1f} ms")
    if r["cuda_bf16"]:
        b = r["cuda_bf16"]
        line("CSSL step, bf16 chan-last", b["step"])
        line("supervised, bf16 chan-last", b["supervised"])
        print(f"bf16 matmul {b['matmul_size']}^3: {b['bf16_matmul_gflops_per_s']:.0f} GFLOP/s; the bf16 step reaches "
              f"{b['percent_of_peak']:.1f}% of it ({b['step']['images_per_s']:.1f} unlabelled images/s, "
              f"{b['step']['patches_per_s']:.0f} patches/s)")
    free_cores = max((mach["cpu_count"] or 1) - mach["threads"], 0)
    if mach["device"] == "cpu" and mach["load_average"] > free_cores + 0.5:
        print(f"note: load average {mach['load_average']:.1f} before the run on {mach['cpu_count']} cores with "
              f"{mach['threads']} threads: other processes compete for the cores and distort these timings "
              f"(compare p90 with the median); rerun when idle or with fewer --threads")


if __name__ == "__main__":
    main(sys.argv[1:])
