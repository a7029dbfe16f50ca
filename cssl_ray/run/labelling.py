"""Step B of a round: the model's pseudo-labels on D_U, their coverage and confidence per class
(the round's instruments), and the class-wise patches a round's labels give. Plain torch, no Ray."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from cssl_ray.config import Config
from cssl_ray.method.collectives import Collectives
from cssl_ray.method.patches import sample_patches
from cssl_ray.method.pseudo_labels import (
    CONFIDENCE_BINS,
    class_counts,
    confidence_histogram,
    histogram_medians,
    predict_pseudo_labels,
    rule_of,
)
from cssl_ray.models.precision import Precision


@torch.no_grad()
def label_round(model: nn.Module, cfg: Config, unlabelled_images: Tensor, *, hidden_masks: Tensor | None = None,
                class_names: list[str] | None = None, labelled_images: Tensor | None = None,
                collectives: Collectives | None = None) -> tuple[Tensor, dict[str, float]]:
    """Step B: pseudo-labels (U, H, W) of D_U with the current model (``pseudo`` rule: the threshold,
    and the class-wise fraction down to the floor), and their statistics: coverage (all pixels, and
    per class: ``pseudo_coverage/<name>``, the share of the pixels predicted as that class that get a
    pseudo-label), the model's confidence (``confidence/<name>``: the median max-softmax of the D_U
    pixels predicted as that class; ``confidence_labelled/<name>`` the same on ``labelled_images``)
    and, when ``hidden_masks`` is given, their accuracy on covered pixels (a diagnostic only).

    With ``collectives`` each rank passes its shard of D_U (and of D_L) and gets its shard's labels;
    the statistics are of the whole D_U: their counts are summed over ranks (every rank calls it)."""
    col = collectives or Collectives()
    device = next(model.parameters()).device
    p = cfg.pseudo
    c = cfg.data.num_classes
    prec = Precision.from_config(cfg.train, device)
    if unlabelled_images.shape[0]:
        pseudo, argmax, confidence = predict_pseudo_labels(model, unlabelled_images.to(device), **rule_of(p),
                                                           batch_size=cfg.consistency.batch_size, with_argmax=True,
                                                           with_confidence=True, precision=prec)
        pseudo, argmax, confidence = pseudo.cpu(), argmax.cpu(), confidence.cpu()  # (U, H, W) each
    else:  # an empty shard still joins the sums
        pseudo = argmax = torch.zeros((0, *unlabelled_images.shape[2:]), dtype=torch.int64)
        confidence = torch.zeros(pseudo.shape)
    covered = pseudo != p.ignore_index
    correct = int(((pseudo == hidden_masks) & covered).sum()) if hidden_masks is not None else 0
    predicted, confident = class_counts(pseudo, argmax, c)
    counts = col.sum_(torch.tensor([covered.numel(), int(covered.sum()), correct], dtype=torch.float64))
    pixels, n_covered, n_correct = counts.tolist()
    predicted, confident = col.sum_(torch.stack([predicted, confident]).to(torch.float64)).tolist()
    stats = {"pseudo_coverage": n_covered / pixels if pixels else 0.0}
    names = class_names or [str(k) for k in range(c)]
    for name, k_pred, k_conf in zip(names, predicted, confident):
        stats[f"pseudo_coverage/{name}"] = k_conf / k_pred if k_pred else float("nan")
    stats.update(confidence_stats(col.sum_(confidence_histogram(argmax, confidence, c)), names))
    if labelled_images is not None:
        stats.update(labelled_confidence(model, cfg, labelled_images, names, collectives))
    if hidden_masks is not None:
        stats["pseudo_accuracy"] = n_correct / max(n_covered, 1)
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
