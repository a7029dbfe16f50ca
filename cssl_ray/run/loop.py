"""One round of CSSL as plain functions: supervised epoch, patch sampling, L_tot epoch, evaluation.

No Ray and no MLflow here: ``cssl_ray.experiments.train`` (single process) and the Ray workers both call these.
Each function takes its tensors and settings explicitly and returns a dict of python floats.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cssl_ray.config import Config
from cssl_ray.data.augment import flip_rotate
from cssl_ray.data.batches import index_batches, labelled_slices
from cssl_ray.evaluation.metrics import SegmentationMetrics
from cssl_ray.evaluation.surface import SurfaceMetrics
from cssl_ray.method.collectives import Collectives, positions_of_rank, rank_share
from cssl_ray.method.consistency import Teacher
from cssl_ray.method.contrastive import AuxiliaryGaussian
from cssl_ray.method.objective import StepInputs, cssl_objective, patch_embeddings
from cssl_ray.method.patches import (
    PatchWindows,
    class_balanced_batches,
    extract_patches,
    sample_patches,
    seeded_patches,
    seeded_windows,
)
from cssl_ray.method.pseudo_labels import (
    CONFIDENCE_BINS,
    class_coverage,
    confidence_histogram,
    coverage,
    histogram_medians,
    predict_pseudo_labels,
    rule_of,
)
from cssl_ray.method.silhouette import silhouette
from cssl_ray.method.streams import RandomStreams
from cssl_ray.models.precision import FP32, Precision, backward_step


def supervised_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, images: Tensor, masks: Tensor, *,
                     batch_size: int, steps: int = 0, augment: bool = True, ignore_index: int = 255,
                     generator: torch.Generator | None = None,
                     collectives: Collectives | None = None, precision: Precision | None = None,
                     scaler: torch.amp.GradScaler | None = None) -> dict[str, float]:
    """L_sup = H(D(E(x)), y) over D_L (stage A, and the fine-tune epoch of every round).

    ``generator`` draws the batches and their augmentation (the run's ``streams.sup``: no other
    purpose draws from it, so every cell of a seed sees the same supervised batches).

    Data parallel (``collectives``): each rank passes its shard, its share of the global batch
    (``collectives.rank_share``) and the same ``steps``; the loss is the mean over the global batch's
    pixels, gradients are averaged over ranks after every backward and ``loss_sup`` is the mean over
    ranks.

    ``precision`` (autocast, channels_last; default fp32) and ``scaler`` (fp16's loss scaler, kept
    across epochs by the caller): ``cssl_ray.models.precision``."""
    col = collectives or Collectives()
    prec = precision or FP32
    model.train()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for idx in index_batches(images.shape[0], batch_size, steps, generator):
        x, y = images[idx], masks[idx]
        if augment:
            x, y = flip_rotate(x, y, generator)
        x, y = prec.layout(x.to(device)), y.to(device)
        with prec.autocast():
            logits = model(x)  # (B, C, H, W), bf16 / fp16 under amp
        # the mean over the GLOBAL batch's labelled pixels (every rank's share; collectives.global_mean)
        loss = col.global_mean(F.cross_entropy(logits.float(), y, ignore_index=ignore_index, reduction="sum"),
                               (y != ignore_index).sum())
        backward_step(loss, optimizer, scaler, after_backward=lambda: col.average_gradients(model))
        total += loss.item()
        count += 1
    return col.mean_floats({"loss_sup": total / max(count, 1)})


@torch.no_grad()
def label_round(model: nn.Module, cfg: Config, unlabelled_images: Tensor, *, hidden_masks: Tensor | None = None,
                class_names: list[str] | None = None,
                labelled_images: Tensor | None = None) -> tuple[Tensor, dict[str, float]]:
    """Step B: pseudo-labels (U, H, W) of D_U with the current model (``pseudo`` rule: the threshold,
    and the class-wise fraction down to the floor), and their statistics: coverage (all pixels, and
    per class: ``pseudo_coverage/<name>``, the share of the pixels predicted as that class that get a
    pseudo-label), the model's confidence (``confidence/<name>``: the median max-softmax of the D_U
    pixels predicted as that class; ``confidence_labelled/<name>`` the same on ``labelled_images``)
    and, when ``hidden_masks`` is given, their accuracy on covered pixels (a diagnostic only)."""
    device = next(model.parameters()).device
    p = cfg.pseudo
    prec = Precision.from_config(cfg.train, device)
    pseudo, argmax, confidence = predict_pseudo_labels(model, unlabelled_images.to(device), **rule_of(p),
                                                       batch_size=cfg.consistency.batch_size, with_argmax=True,
                                                       with_confidence=True, precision=prec)
    pseudo, argmax = pseudo.cpu(), argmax.cpu()  # (U, H, W) each
    stats = {"pseudo_coverage": coverage(pseudo, p.ignore_index)}
    names = class_names or [str(c) for c in range(cfg.data.num_classes)]
    for name, share in zip(names, class_coverage(pseudo, argmax, cfg.data.num_classes)):
        stats[f"pseudo_coverage/{name}"] = share
    stats.update(confidence_stats(confidence_histogram(argmax, confidence.cpu(), cfg.data.num_classes), names))
    if labelled_images is not None:
        stats.update(labelled_confidence(model, cfg, labelled_images, names))
    if hidden_masks is not None:
        covered = pseudo != p.ignore_index
        correct = (pseudo == hidden_masks) & covered
        stats["pseudo_accuracy"] = correct.sum().item() / max(covered.sum().item(), 1)
    return pseudo, stats


def confidence_stats(hist: Tensor, class_names: list[str], prefix: str = "confidence") -> dict[str, float]:
    """``{prefix}/<name>``: the median confidence of each class's pixels from a (C, bins)
    ``confidence_histogram`` (NaN for a class no pixel is predicted as)."""
    return {f"{prefix}/{name}": m for name, m in zip(class_names, histogram_medians(hist))}


@torch.no_grad()
def labelled_confidence(model: nn.Module, cfg: Config, images: Tensor, class_names: list[str],
                        collectives: Collectives | None = None) -> dict[str, float]:
    """``confidence_labelled/<name>``: the model's median max-softmax per predicted class on the
    labelled images (with ``collectives``: each rank's shard, histograms summed over ranks). A model
    that is uncertain on its own training images cannot pass a high pseudo-label threshold on D_U."""
    device = next(model.parameters()).device
    c = cfg.data.num_classes
    hist = torch.zeros(c, CONFIDENCE_BINS, dtype=torch.int64)
    if images.shape[0]:
        _, argmax, confidence = predict_pseudo_labels(model, images.to(device), 1.0, cfg.pseudo.ignore_index,
                                                      batch_size=cfg.consistency.batch_size, with_argmax=True,
                                                      with_confidence=True,
                                                      precision=Precision.from_config(cfg.train, device))
        hist = confidence_histogram(argmax.cpu(), confidence.cpu(), c)
    if collectives is not None:
        hist = collectives.sum_(hist)
    return confidence_stats(hist, class_names, "confidence_labelled")


@torch.no_grad()
def round_patches(model: nn.Module, cfg: Config, labelled_images: Tensor, labelled_masks: Tensor,
                  unlabelled_images: Tensor, *, generator: torch.Generator | None = None,
                  hidden_masks: Tensor | None = None,
                  class_names: list[str] | None = None) -> tuple[Tensor, Tensor, dict[str, float]]:
    """Steps B and C for the whole round at once: ``label_round``, then class-wise patches from D_L
    (ground truth) and D_U (pseudo-labels), ``patches.per_image`` windows per image split over the
    foreground classes present. Returns patches (P, C_in, s, s), classes (P,) and ``label_round``'s
    statistics plus ``patches``. (The trainer samples per step, ``local_steps``; this is the
    one-process reference of benchmarks/patch_stream.py.)"""
    p, pt = cfg.pseudo, cfg.patches
    stats: dict[str, float] = {}
    images, labels = labelled_images, labelled_masks
    if unlabelled_images.shape[0] > 0:
        pseudo, stats = label_round(model, cfg, unlabelled_images, hidden_masks=hidden_masks, class_names=class_names)
        images = torch.cat([labelled_images, unlabelled_images])
        labels = torch.cat([labelled_masks, pseudo])
    classes = list(range(1, cfg.data.num_classes))
    patches, patch_classes, _ = sample_patches(images, labels, pt.size, pt.min_pixels,
                                               per_image=pt.per_image, mask=pt.mask,
                                               classes=classes, ignore_index=p.ignore_index,
                                               generator=generator)
    stats["patches"] = float(patches.shape[0])
    return patches, patch_classes, stats


@contextmanager
def frozen_norm_statistics(model: nn.Module) -> Iterator[None]:
    """Normalise with batch statistics but leave BatchNorm running statistics untouched
    (``train.ltot_bn: frozen``; momentum 0 keeps running stats unchanged).

    The argument for it: masked class-wise patches and noise-perturbed bottlenecks do not look like
    the full images the network is evaluated on. Measured against it (docs/science.md, the round
    probe): with frozen statistics the rounds did not raise validation Dice, with updated ones they
    did, so ``update`` is the default.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum in zip(norms, saved):
            m.momentum = momentum


def l_tot_steps(n_unlabelled: int, cfg: Config, world: int = 1) -> int:
    """Steps of one L_tot epoch: ``train.round_passes`` passes over D_U (all ranks' images,
    ``n_unlabelled``) in global batches of ``consistency.batch_size``, capped by
    ``train.steps_per_round`` (> 0). The same for every cell with L_CL or L_CR, so the ablation
    compares losses, not amounts of work."""
    n = _pass_batches(n_unlabelled, cfg.consistency.batch_size, world) * cfg.train.round_passes
    return min(n, cfg.train.steps_per_round) if cfg.train.steps_per_round > 0 else n


def _pass_batches(n: int, batch_size: int, world: int) -> int:
    """Global batches of one pass over ``n`` items: ceil(n / batch_size), except that a last batch
    with fewer items than ranks joins the one before (every rank needs an item at every step;
    never with one rank)."""
    steps = math.ceil(n / batch_size)
    return steps - 1 if steps > 1 and n - (steps - 1) * batch_size < world else steps


def pass_shares(n_local: int, n_global: int, batch_size: int, rank: int, world: int,
                generator: torch.Generator | None = None) -> list[Tensor]:
    """This rank's part of every global batch of one shuffled pass over D_U.

    The pass's global batches are ``batch_size`` consecutive positions of ``n_global`` (the last
    one smaller, ``_pass_batches``); position p belongs to rank p % world, and this rank holds the
    images ``[rank::world]`` (``n_local`` of them), shuffled by ``generator``. One rank: the
    shuffled pass split into batches of ``batch_size``."""
    if batch_size < world:
        raise ValueError(f"a global batch of {batch_size} cannot give each of {world} ranks an item")
    steps = _pass_batches(n_global, batch_size, world)
    bounds = [k * batch_size for k in range(steps)] + [n_global]
    sizes = [positions_of_rank(a, b, rank, world) for a, b in zip(bounds[:-1], bounds[1:])]
    if sum(sizes) != n_local:
        raise ValueError(f"rank {rank} of {world} holds {n_local} of {n_global} images; its share is {sum(sizes)}")
    return list(torch.randperm(n_local, generator=generator).split(sizes)) if n_local else []


@dataclass
class StepData:
    """One L_tot step's inputs on one rank.

    ``unlabelled`` (b, C, H, W): this rank's share of the step's L_CR batch. ``patches``
    (P, C, s, s) and ``classes`` (P,): the step's patch pool, the class-wise windows of those
    images (their pseudo-labels) and of a slice of D_L (ground truth), from which the step's
    class-balanced contrastive batch is drawn; ``patches.per_image`` windows per image give the
    paper's density (816 patches from 8 images)."""

    unlabelled: Tensor
    patches: Tensor
    classes: Tensor


def epoch_plan(n_unlabelled: int, cfg: Config, streams: RandomStreams,
               collectives: Collectives | None = None) -> list[Tensor]:
    """This rank's D_U positions of every step of one L_tot epoch (``train.round_passes`` shuffled
    passes over D_U in global batches, ``pass_shares``; ``l_tot_steps`` steps, agreed by every rank).
    Draws the passes from ``streams.cr``."""
    col = collectives or Collectives()
    n_global = int(col.sum_(torch.tensor([n_unlabelled], dtype=torch.int64)).item())
    n_steps = col.agree_steps(l_tot_steps(n_global, cfg, col.world_size)) if n_global else 0
    if not n_steps:
        return []
    plan: list[Tensor] = []
    while len(plan) < n_steps:
        plan += pass_shares(n_unlabelled, n_global, cfg.consistency.batch_size, col.rank, col.world_size, streams.cr)
    return plan[:n_steps]


def image_patches(cfg: Config, images: Tensor, labels: Tensor, indices: Tensor | list[int], round_: int,
                  labelled: bool) -> tuple[Tensor, Tensor]:
    """``patches.seeded_patches`` with the run's settings: the class-wise patches (P, C, s, s) and
    classes (P,) of these images in this round, the same in every path."""
    pt = cfg.patches
    patches, classes, _ = seeded_patches(
        images, labels, [int(i) for i in indices], size=pt.size, min_pixels=pt.min_pixels,
        per_image=pt.per_image, classes=list(range(1, cfg.data.num_classes)),
        seed=cfg.train.seed, round_=round_, labelled=labelled, mask=pt.mask, ignore_index=cfg.pseudo.ignore_index)
    return patches, classes


def image_windows(cfg: Config, labels: Tensor, indices: Tensor | list[int], round_: int, labelled: bool) -> PatchWindows:
    """``patches.seeded_windows`` with the run's settings: the windows ``image_patches`` cuts."""
    pt = cfg.patches
    return seeded_windows(labels, [int(i) for i in indices], size=pt.size, min_pixels=pt.min_pixels,
                          per_image=pt.per_image, classes=list(range(1, cfg.data.num_classes)), seed=cfg.train.seed,
                          round_=round_, labelled=labelled, ignore_index=cfg.pseudo.ignore_index)


def cut_patches(cfg: Config, images: Tensor, labels: Tensor, windows: PatchWindows) -> Tensor:
    """The masked patches (P, C, s, s) of ``windows`` in ``images`` / ``labels`` (``image_windows``'):
    ``image_patches``' patches, cut where the images are."""
    pt = cfg.patches
    return extract_patches(images, labels, windows, pt.size, mask=pt.mask, ignore_index=cfg.pseudo.ignore_index)


def local_steps(cfg: Config, round_: int, plan: list[Tensor], unlabelled: Tensor, pseudo: Tensor,
                labelled_images: Tensor, labelled_masks: Tensor) -> Iterator[StepData]:
    """The steps of ``plan`` in one process: step k's images, the patches of their pseudo-labels
    (``pseudo``, labelled with the round's weights before the epoch) and of its D_L slice."""
    slices = labelled_slices(labelled_images.shape[0], len(plan))
    for idx, l_idx in zip(plan, slices):
        u_p, u_c = image_patches(cfg, unlabelled[idx], pseudo[idx], idx, round_, labelled=False)
        l_p, l_c = image_patches(cfg, labelled_images[l_idx], labelled_masks[l_idx], l_idx, round_, labelled=True)
        yield StepData(unlabelled[idx], torch.cat([l_p, u_p]), torch.cat([l_c, u_c]))


def pooled_steps(plan: list[Tensor], unlabelled: Tensor, patches: Tensor, classes: Tensor) -> Iterator[StepData]:
    """Steps of ``plan`` that all draw their contrastive batch from one pool (e.g. a whole round's
    patches from ``round_patches``): for tests and benchmarks that fix the patches."""
    for idx in plan:
        yield StepData(unlabelled[idx], patches, classes)


def cssl_epoch(model: nn.Module, teacher: Teacher | None, optimizer: torch.optim.Optimizer,
               steps: Iterable[StepData], n_steps: int, cfg: Config, *,
               lambda_: float, streams: RandomStreams, aux: AuxiliaryGaussian | None = None,
               collectives: Collectives | None = None,
               after_step: Callable[[], None] | None = None,
               scaler: torch.amp.GradScaler | None = None,
               labelled: tuple[Tensor, Tensor] | None = None) -> dict[str, float]:
    """One epoch of L_tot = w_cl L_CL + w_cr L_CR: one pass over D_U, ``n_steps`` steps.

    ``labelled`` (images, masks of this rank's D_L) with ``train.lsup_in_ltot``: every step also
    takes a supervised batch (``train.batch_size`` global, augmented, from ``streams.ltot_sup``) and
    L_sup joins L_tot. ``train.ltot_bn``: BatchNorm running statistics frozen (default) or updated.

    ``steps`` yields each step's ``StepData`` (``local_steps`` in one process; the labelling
    stream in a Ray worker, consumed as it arrives): its batch of unlabelled images for L_CR and
    its patch pool, from which one class-balanced batch of ``patches.batch_size`` patches is drawn
    for L_CL (``streams.patches``). A cell with only one of the losses runs the same steps and skips
    the other's input; omega (silhouette of the patch embeddings) is measured at every step with
    patches and averaged.

    Data parallel (``collectives``, see ``cssl_ray.method.collectives``): each rank passes its own steps
    (its share of every global batch: ``epoch_plan``) and the same ``n_steps``; the contrastive batch
    is global (each rank draws its ``rank_share``), L_CL runs on the all-gathered embeddings, a step
    has patches only if every rank's pool has some, gradients are averaged after every backward, and
    statistics are averaged over ranks. None = one process.

    Precision (``train.amp``, ``train.channels_last``): ``cssl_ray.models.precision``; ``scaler`` is fp16's
    loss scaler, kept across epochs by the caller (None under fp16: a fresh one for this epoch).
    """
    t = cfg.train
    col = collectives or Collectives()
    device = next(model.parameters()).device
    prec = Precision.from_config(t, device)
    scaler = scaler if scaler is not None else prec.grad_scaler()
    model.train()
    share = rank_share(cfg.patches.batch_size, col.rank, col.world_size)  # of the global contrastive batch
    sums: dict[str, float] = {"loss": 0.0, "loss_cl": 0.0, "loss_cr": 0.0, "anchors_without_positive": 0.0}
    omegas: list[float] = []
    done, pooled, realised, kinds = 0, 0, 0, 0
    sup_batches: Iterator[Tensor] = iter(())
    if t.lsup_in_ltot and labelled is not None and labelled[0].shape[0]:
        sup_batches = index_batches(labelled[0].shape[0], rank_share(t.batch_size, col.rank, col.world_size),
                                    steps=n_steps, generator=streams.ltot_sup)
        sums["loss_sup_ltot"] = 0.0
    norms = frozen_norm_statistics(model) if t.ltot_bn == "frozen" else nullcontext()
    with norms:  # by default patches and noisy features must not move BN statistics
        for _, step in zip(range(n_steps), steps):
            pooled += step.patches.shape[0]
            x_u = step.unlabelled.to(device) if (t.use_cr and step.unlabelled.shape[0]) else None
            w = c = None
            if col.agree_steps(int(step.patches.shape[0] > 0)):  # omega's collectives need every rank
                idx = class_balanced_batches(step.classes, share, num_batches=1, generator=streams.patches)[0]
                w, c = step.patches[idx].to(device), step.classes[idx].to(device)
                realised += idx.numel()
                kinds += int(torch.unique(step.classes[idx]).numel())
            if not (t.use_cl and w is not None) and x_u is None:
                continue  # nothing to learn from (no patches and no unlabelled images): the same on every rank
            w, x_u = prec.layout(w), prec.layout(x_u)
            inputs = StepInputs(w if t.use_cl else None, c if t.use_cl else None, x_u)
            sup_idx = next(sup_batches, None)
            if sup_idx is not None:
                x_l, y_l = labelled[0][sup_idx], labelled[1][sup_idx]
                if t.augment:
                    x_l, y_l = flip_rotate(x_l, y_l, streams.ltot_sup)
                inputs.labelled, inputs.labelled_masks = prec.layout(x_l.to(device)), y_l.to(device)
            with prec.autocast():  # the losses themselves are computed in fp32
                out = cssl_objective(model, teacher if t.use_cr else None, inputs, cfg, lambda_=lambda_,
                                     aux=aux, streams=streams, collectives=col)
            backward_step(out["loss"], optimizer, scaler, after_backward=lambda: col.average_gradients(model))
            if after_step is not None:
                after_step()
            if teacher is not None:
                teacher.update(model)
            done += 1
            for k in sums:
                if k in out:
                    sums[k] += float(out[k].detach())
            if w is not None:
                omegas.append(patch_omega(model, w, c, cfg, aux, streams, col, out=out))
    stats = {k: v / max(done, 1) for k, v in sums.items()}
    stats = col.mean_floats(stats)
    stats["steps"] = float(done)
    stats["patches"] = float(col.sum_(torch.tensor([pooled], dtype=torch.int64)).item())  # in the steps' pools
    # the realised contrastive batch (all ranks' shares) per step, and the classes it held (rank 0's)
    stats["patches_per_step"] = float(col.sum_(torch.tensor([realised], dtype=torch.int64)).item()) / max(done, 1)
    stats["patch_classes_per_step"] = col.broadcast_float(kinds / max(done, 1))
    stats["omega"] = sum(omegas) / len(omegas) if omegas else float("nan")
    return stats


@torch.no_grad()
def measure_omega(model: nn.Module, patches: Tensor, patch_classes: Tensor, cfg: Config,
                  aux: AuxiliaryGaussian | None, streams: RandomStreams,
                  collectives: Collectives | None = None) -> float:
    """Omega of the current model (eval mode) on one class-balanced batch of the round's patches:
    round 1's lambda_ comes from the supervised model's own embeddings, not from a neutral guess.
    NaN when no rank has a patch."""
    col = collectives or Collectives()
    batches = []
    if patches.shape[0] > 0:
        batches = class_balanced_batches(patch_classes, rank_share(cfg.patches.batch_size, col.rank, col.world_size),
                                         num_batches=1, generator=streams.omega)
    if col.agree_steps(len(batches)) == 0:
        return float("nan")
    device = next(model.parameters()).device
    idx = batches[0]
    return patch_omega(model, patches[idx].to(device), patch_classes[idx].to(device), cfg, aux, streams, col)


@torch.no_grad()
def patch_omega(model: nn.Module, patches: Tensor, classes: Tensor, cfg: Config, aux: AuxiliaryGaussian | None,
           streams: RandomStreams, col: Collectives | None = None, out: dict | None = None) -> float:
    """Silhouette of a step's patch embeddings over every rank (with the auxiliary class for one-class data).

    ``out``: the step's objective output; its embeddings (already all-gathered), their classes and
    auxiliary samples are reused when L_CL computed them, else this rank's patches are embedded here
    in eval mode (no gradient) and gathered. The silhouette's subsample and the auxiliary samples
    draw from the shared ``streams.omega``, and rank 0's value is broadcast, so every rank uses the
    same omega, hence the same lambda_."""
    col = col or Collectives()
    out = out or {}
    z, aux_batch = out.get("z"), out.get("aux")
    if z is not None:
        classes = out["classes"]
    else:  # L_CL off: embed under no_grad just to measure clustering
        was_training = model.training
        model.eval()
        z = col.gather(patch_embeddings(model, patches))  # (sum_r P_r, D)
        model.train(was_training)
        classes = col.gather(classes)
        if aux is not None:
            aux_batch = aux.sample(cfg.contrastive.aux_samples or z.shape[0], generator=streams.omega).to(z.device)
    s = cfg.silhouette
    # every rank computes it (so the shared stream advances alike everywhere); rank 0's value is used
    omega = silhouette(z, classes, metric=s.metric, kind=s.kind, aux=aux_batch,
                       max_samples=s.max_samples, generator=streams.omega)
    return col.broadcast_float(omega)


@torch.no_grad()
def evaluate(model: nn.Module, images: Tensor, masks: Tensor, *, num_classes: int, class_names: list[str],
             ignore_index: int = 255, batch_size: int = 8, auprc: bool = False, surface: bool = False,
             collectives: Collectives | None = None, precision: Precision | None = None) -> dict[str, float]:
    """Validation / test: cross-entropy and Dice, IoU (and AUPRC) accumulated over all pixels.

    ``surface``: also the per-image HD95, ASD and Dice (``cssl_ray.evaluation.surface``: keys hd95_*, asd_*,
    dice_image_*, surface_one_empty/*); CPU distance transforms per image, so for the test set only.
    With ``collectives`` each rank passes its shard of the images; the counts are summed over
    ranks before the metrics are computed, so every rank returns the whole set's metrics. Pass the
    unwrapped model: a DDP forward is a collective, and shards may hold different batch counts.
    ``precision``: the forward's autocast and layout (default fp32); the metrics are fp32."""
    prec = precision or FP32
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    metrics = SegmentationMetrics(num_classes, ignore_index=ignore_index, class_names=class_names, auprc=auprc)
    per_image = SurfaceMetrics(num_classes, ignore_index=ignore_index, class_names=class_names) if surface else None
    loss_sum, pixels = 0.0, 0
    for start in range(0, images.shape[0], batch_size):
        x = prec.layout(images[start:start + batch_size].to(device))
        y = masks[start:start + batch_size].to(device)
        with prec.autocast():
            logits = model(x)  # (B, C, H, W)
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, y, ignore_index=ignore_index, reduction="sum").item()
        pixels += int((y != ignore_index).sum())
        metrics.update(logits.cpu(), y.cpu())
        if per_image is not None:
            per_image.update(logits.argmax(1).cpu(), y.cpu())
    model.train(was_training)
    if collectives is not None:
        for acc in [metrics] + ([per_image] if per_image is not None else []):
            summed = {k: collectives.sum_(v) for k, v in acc.state().items()}
            acc.reset()
            acc.merge_state(summed)
        totals = collectives.sum_(torch.tensor([loss_sum, float(pixels)], dtype=torch.float64))
        loss_sum, pixels = float(totals[0]), int(totals[1])
    result = {"loss": loss_sum / max(pixels, 1)}
    result.update(metrics.compute())
    if per_image is not None:
        result.update(per_image.compute())
    return result
