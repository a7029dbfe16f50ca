"""One round of CSSL as plain functions: supervised epoch, patch sampling, L_tot epoch, evaluation.

No Ray and no MLflow here: ``cssl_ray.experiments.train`` (single process) and the Ray workers both call these.
Each function takes its tensors and settings explicitly and returns a dict of python floats.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cssl_ray.config import Config
from cssl_ray.data.augment import flip_rotate
from cssl_ray.data.batches import index_batches
from cssl_ray.evaluation.metrics import SegmentationMetrics
from cssl_ray.evaluation.surface import SurfaceMetrics
from cssl_ray.method.collectives import Collectives, rank_share
from cssl_ray.method.consistency import Teacher
from cssl_ray.method.contrastive import AuxiliaryGaussian
from cssl_ray.method.objective import StepInputs, Terms, cssl_objective, patch_embeddings
from cssl_ray.method.patches import class_balanced_batches
from cssl_ray.method.silhouette import silhouette
from cssl_ray.method.streams import RandomStreams
from cssl_ray.method.supervised import supervised_loss
from cssl_ray.models.precision import FP32, Precision, backward_step
from cssl_ray.run.plan import StepData


def supervised_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, images: Tensor, masks: Tensor, *,
                     batch_size: int, steps: int = 0, augment: bool = True, ignore_index: int = 255,
                     generator: torch.Generator | None = None,
                     collectives: Collectives | None = None, precision: Precision | None = None,
                     scaler: torch.amp.GradScaler | None = None, sup_loss: str = "ce") -> dict[str, float]:
    """L_sup = H(D(E(x)), y) over D_L (stage A, and the fine-tune epoch of every round); ``sup_loss``
    "ce_dice" adds SSL4MIS's Dice term (``train.sup_loss``, ``cssl_ray.method.supervised``).

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
            logits = col.step(model, lambda m: m(x))  # (B, C, H, W), bf16 / fp16 under amp
        # the mean over the GLOBAL batch's labelled pixels (every rank's share; collectives.global_mean)
        ce = col.global_mean(F.cross_entropy(logits.float(), y, ignore_index=ignore_index, reduction="sum"),
                             (y != ignore_index).sum())
        loss = supervised_loss(ce, logits, y, ignore_index, sup_loss, col)
        backward_step(loss, optimizer, scaler, after_backward=lambda: col.average_gradients(model))
        total += loss.item()
        count += 1
    return col.mean_floats({"loss_sup": total / max(count, 1)})

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
    terms = Terms.of(cfg)  # the slice of the config the objective reads
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
                out = col.step(model, lambda m: cssl_objective(m, teacher if t.use_cr else None, inputs, terms,
                                                               lambda_=lambda_, aux=aux, streams=streams, collectives=col))
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
