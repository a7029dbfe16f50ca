"""One round of CSSL as plain functions: supervised epoch, patch sampling, L_tot epoch, evaluation.

No Ray and no MLflow here: ``cssl_ray.train`` (single process) and the Ray workers both call these.
Each function takes its tensors and settings explicitly and returns a dict of python floats.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cssl_ray.augment import flip_rotate
from cssl_ray.collectives import Collectives
from cssl_ray.config import Config
from cssl_ray.consistency import Teacher
from cssl_ray.contrastive import AuxiliaryGaussian
from cssl_ray.metrics import SegmentationMetrics
from cssl_ray.objective import StepInputs, cssl_objective, patch_embeddings
from cssl_ray.patches import class_balanced_batches, sample_patches
from cssl_ray.pseudo_labels import coverage, predict_pseudo_labels
from cssl_ray.silhouette import silhouette


def index_batches(n: int, batch_size: int, steps: int = 0,
                  generator: torch.Generator | None = None) -> Iterator[Tensor]:
    """Shuffled index batches: one pass over ``n`` items, or exactly ``steps`` batches (reshuffling
    after every pass) when ``steps`` > 0. Small sets are padded by drawing again, so every batch
    holds min(batch_size, n) items."""
    if n <= 0:
        return
    bs = min(batch_size, n)
    total = steps if steps > 0 else math.ceil(n / bs)
    perm = torch.randperm(n, generator=generator)
    pos = 0
    for _ in range(total):
        if pos + bs > n:
            perm = torch.cat([perm[pos:], torch.randperm(n, generator=generator)])
            pos = 0
        yield perm[pos:pos + bs]
        pos += bs


def supervised_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, images: Tensor, masks: Tensor, *,
                     batch_size: int, steps: int = 0, augment: bool = True, ignore_index: int = 255,
                     generator: torch.Generator | None = None,
                     collectives: Collectives | None = None) -> dict[str, float]:
    """L_sup = H(D(E(x)), y) over D_L (stage A, and the fine-tune epoch of every round).

    Data parallel (``collectives``): each rank passes its shard and the same ``steps``; gradients
    are averaged over ranks after every backward and ``loss_sup`` is the mean over ranks."""
    col = collectives or Collectives()
    model.train()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for idx in index_batches(images.shape[0], batch_size, steps, generator):
        x, y = images[idx], masks[idx]
        if augment:
            x, y = flip_rotate(x, y, generator)
        x, y = x.to(device), y.to(device)
        loss = F.cross_entropy(model(x), y, ignore_index=ignore_index)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        col.average_gradients(model)
        optimizer.step()
        total += loss.item()
        count += 1
    return col.mean_floats({"loss_sup": total / max(count, 1)})


@torch.no_grad()
def round_patches(model: nn.Module, cfg: Config, labelled_images: Tensor, labelled_masks: Tensor,
                  unlabelled_images: Tensor, *, generator: torch.Generator | None = None,
                  hidden_masks: Tensor | None = None) -> tuple[Tensor, Tensor, dict[str, float]]:
    """Steps B and C: pseudo-label D_U with the current model, then class-wise patches from D_L
    (ground truth) and D_U (pseudo-labels). Returns patches (P, C_in, s, s), classes (P,) and
    stats: pseudo-label coverage, and, when ``hidden_masks`` is given, their accuracy on covered
    pixels (a diagnostic only)."""
    device = next(model.parameters()).device
    p, pt = cfg.pseudo, cfg.patches
    stats: dict[str, float] = {}
    images, labels = labelled_images, labelled_masks
    if unlabelled_images.shape[0] > 0:
        pseudo = predict_pseudo_labels(model, unlabelled_images.to(device), p.threshold, p.ignore_index,
                                       batch_size=cfg.consistency.batch_size).cpu()  # (U, H, W)
        stats["pseudo_coverage"] = coverage(pseudo, p.ignore_index)
        if hidden_masks is not None:
            covered = pseudo != p.ignore_index
            correct = (pseudo == hidden_masks) & covered
            stats["pseudo_accuracy"] = correct.sum().item() / max(covered.sum().item(), 1)
        images = torch.cat([labelled_images, unlabelled_images])
        labels = torch.cat([labelled_masks, pseudo])
    classes = list(range(1, cfg.data.num_classes))
    patches, patch_classes, _ = sample_patches(images, labels, pt.size, pt.min_pixels,
                                               per_class=pt.per_class_per_image, mask=pt.mask,
                                               classes=classes, ignore_index=p.ignore_index,
                                               generator=generator)
    stats["patches"] = float(patches.shape[0])
    return patches, patch_classes, stats


@contextmanager
def frozen_norm_statistics(model: nn.Module) -> Iterator[None]:
    """Normalise with batch statistics but leave BatchNorm running statistics untouched.

    Masked class-wise patches and noise-perturbed bottlenecks do not look like the full images
    the network is evaluated on; letting them update the running statistics would shift every
    BatchNorm layer away from the data it is used on. (momentum 0 keeps running stats unchanged.)
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


def cssl_epoch(model: nn.Module, teacher: Teacher | None, optimizer: torch.optim.Optimizer,
               patches: Tensor, patch_classes: Tensor, unlabelled_images: Tensor, cfg: Config, *,
               lambda_: float, aux: AuxiliaryGaussian | None = None,
               generator: torch.Generator | None = None,
               collectives: Collectives | None = None) -> dict[str, float]:
    """One epoch of L_tot = w_cl L_CL + w_cr L_CR.

    Steps: one per class-balanced patch batch (or per unlabelled image batch when L_CL is off),
    capped by ``train.steps_per_round``. Omega (silhouette of the patch embeddings) is measured at
    every step and averaged over the epoch; the caller turns it into the next epoch's lambda_.

    Data parallel (``collectives``, see ``cssl_ray.collectives``): each rank passes its own shard of
    patches and unlabelled images; the ranks agree on the step count (the minimum), average
    gradients after every backward, measure omega on all ranks' embeddings, and return statistics
    averaged over ranks. None = one process.
    """
    t = cfg.train
    col = collectives or Collectives()
    device = next(model.parameters()).device
    model.train()
    patch_batches: list[Tensor] = []
    if patches.shape[0] > 0:
        patch_batches = class_balanced_batches(patch_classes, cfg.patches.batch_size, generator=generator)
    if t.use_cl:
        n_steps = len(patch_batches)
    else:  # L_CR only: one pass over D_U; patches are still embedded (no grad) to measure omega
        n_steps = math.ceil(unlabelled_images.shape[0] / cfg.consistency.batch_size)
    if t.steps_per_round > 0:
        n_steps = min(n_steps, t.steps_per_round)
    if col.agree_steps(len(patch_batches)) == 0:
        patch_batches = []  # some rank has no patch: omega's collectives need every rank
    n_steps = col.agree_steps(n_steps)
    u_iter = index_batches(unlabelled_images.shape[0], cfg.consistency.batch_size, steps=n_steps,
                           generator=generator)
    sums: dict[str, float] = {"loss": 0.0, "loss_cl": 0.0, "loss_cr": 0.0, "anchors_without_positive": 0.0}
    omegas: list[float] = []
    with frozen_norm_statistics(model):  # patches and noisy features must not move BN statistics
        for step in range(n_steps):
            u_idx = next(u_iter, None)
            x_u = unlabelled_images[u_idx].to(device) if (t.use_cr and u_idx is not None) else None
            w = c = None
            if patch_batches:
                idx = patch_batches[step % len(patch_batches)]
                w, c = patches[idx].to(device), patch_classes[idx].to(device)
            if not (t.use_cl and w is not None) and x_u is None:
                continue  # nothing to learn from (no patches and no unlabelled images)
            inputs = StepInputs(w if t.use_cl else None, c if t.use_cl else None, x_u)
            out = cssl_objective(model, teacher if t.use_cr else None, inputs, cfg, lambda_=lambda_,
                                 aux=aux, generator=generator)
            optimizer.zero_grad(set_to_none=True)
            out["loss"].backward()
            col.average_gradients(model)
            optimizer.step()
            if teacher is not None:
                teacher.update(model)
            for k in sums:
                if k in out:
                    sums[k] += float(out[k].detach())
            if w is not None:
                omegas.append(_omega(model, out, w, c, cfg, aux, generator, col))
    stats = {k: v / max(n_steps, 1) for k, v in sums.items()}
    stats = col.mean_floats(stats)
    stats["steps"] = float(n_steps)
    stats["omega"] = sum(omegas) / len(omegas) if omegas else float("nan")
    return stats


@torch.no_grad()
def _omega(model: nn.Module, out: dict, patches: Tensor, classes: Tensor, cfg: Config,
           aux: AuxiliaryGaussian | None, generator: torch.Generator | None,
           col: Collectives | None = None) -> float:
    """Silhouette of this step's patch embeddings (with the auxiliary class for one-class data).

    With ``col``, the embeddings, classes and auxiliary samples of every rank are gathered first
    and rank 0's value is broadcast, so every rank uses the same omega (hence the same lambda_)."""
    z = out.get("z")
    aux_batch = out.get("aux")
    if z is None:  # L_CL off: embed under no_grad just to measure clustering
        was_training = model.training
        model.eval()
        z = patch_embeddings(model, patches)
        model.train(was_training)
        if aux is not None:
            aux_batch = aux.sample(cfg.contrastive.aux_samples or z.shape[0], generator=generator).to(z.device)
    s = cfg.silhouette
    if col is None or col.world_size == 1:
        return silhouette(z, classes, metric=s.metric, kind=s.kind, aux=aux_batch,
                          max_samples=s.max_samples, generator=generator)
    z, classes = col.gather(z), col.gather(classes)  # (sum_r P_r, D), (sum_r P_r,)
    if aux_batch is not None:
        aux_batch = col.gather(aux_batch)
    omega = float("nan")
    if col.rank == 0:  # the subsample draws from rank 0's generator only
        omega = silhouette(z, classes, metric=s.metric, kind=s.kind, aux=aux_batch,
                           max_samples=s.max_samples, generator=generator)
    return col.broadcast_float(omega)


@torch.no_grad()
def evaluate(model: nn.Module, images: Tensor, masks: Tensor, *, num_classes: int, class_names: list[str],
             ignore_index: int = 255, batch_size: int = 8, auprc: bool = False,
             collectives: Collectives | None = None) -> dict[str, float]:
    """Validation / test: cross-entropy and Dice, IoU (and AUPRC) accumulated over all pixels.

    With ``collectives`` each rank passes its shard of the images; the counts are summed over
    ranks before the metrics are computed, so every rank returns the whole set's metrics. Pass the
    unwrapped model: a DDP forward is a collective, and shards may hold different batch counts."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    metrics = SegmentationMetrics(num_classes, ignore_index=ignore_index, class_names=class_names, auprc=auprc)
    loss_sum, pixels = 0.0, 0
    for start in range(0, images.shape[0], batch_size):
        x = images[start:start + batch_size].to(device)
        y = masks[start:start + batch_size].to(device)
        logits = model(x)  # (B, C, H, W)
        loss_sum += F.cross_entropy(logits.float(), y, ignore_index=ignore_index, reduction="sum").item()
        pixels += int((y != ignore_index).sum())
        metrics.update(logits.cpu(), y.cpu())
    model.train(was_training)
    if collectives is not None:
        summed = {k: collectives.sum_(v) for k, v in metrics.state().items()}
        metrics.reset()
        metrics.merge_state(summed)
        totals = collectives.sum_(torch.tensor([loss_sum, float(pixels)], dtype=torch.float64))
        loss_sum, pixels = float(totals[0]), int(totals[1])
    result = {"loss": loss_sum / max(pixels, 1)}
    result.update(metrics.compute())
    return result
