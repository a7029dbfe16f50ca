"""Pseudo-labels (step B of a CSSL round).

The current model predicts the unlabelled images D_U; a pixel gets its argmax class where the
softmax confidence is at least ``threshold`` and ``ignore_index`` elsewhere. Labelled images use
their ground truth. The pseudo-labels are regenerated from the latest model every round.

    threshold      softmax confidence a pixel needs, in (0, 1]; default 0.9. A probability exactly
                   equal to the threshold passes. 1.0 keeps only saturated pixels.
    class_fraction with > 0, a class-wise rule on top (``confident_labels``): in each image, the
                   most confident ``class_fraction`` of the pixels predicted as a class also pass,
                   however far under ``threshold`` the class's confidence sits, so no predicted
                   class loses all its pseudo-labels to an uncalibrated model (FixMatch's fixed
                   threshold, made class-wise as FlexMatch / U2PL do; docs/science.md measures it)
    floor          tau_conf, the hard floor of the class-wise rule: no pixel under it passes
    ignore_index   label of the pixels that do not pass (default 255); must not be a class id.

Confidence (an instrument, ``confidence_histogram`` / ``histogram_medians``): per class, the median
max-softmax of the pixels predicted as that class, from summable (C, bins) histograms.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from cssl_ray.models.precision import FP32, Precision


def _check_threshold(threshold: float) -> None:
    if not 0.0 < threshold <= 1.0:  # also rejects NaN
        raise ValueError(f"threshold must be in (0, 1], got {threshold!r}")


def pseudo_labels(logits: Tensor, threshold: float, ignore_index: int = 255) -> Tensor:
    """Confident argmax labels.

    Args:
        logits: ``(B, C, H, W)`` class scores (any float dtype; softmax is taken in float32).
        threshold: confidence in (0, 1]; a pixel whose max softmax probability is ``>= threshold``
            gets its argmax class (ties go to the lowest class index).
        ignore_index: label for the other pixels; must be negative or >= C.

    Returns:
        ``(B, H, W)`` int64 on the logits' device. Pixels with NaN logits get ``ignore_index``.
        ``B = 0`` gives an empty ``(0, H, W)`` tensor.
    """
    _check_threshold(threshold)
    if logits.dim() != 4:
        raise ValueError(f"logits must be (B, C, H, W), got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be a float tensor, got dtype {logits.dtype}")
    num_classes = logits.shape[1]
    if num_classes < 1:
        raise ValueError(f"logits need at least one class channel, got shape {tuple(logits.shape)}")
    if 0 <= ignore_index < num_classes:
        raise ValueError(f"ignore_index {ignore_index} is a class id; use a value < 0 or >= C ({num_classes})")
    probs = torch.softmax(logits.float(), dim=1)  # (B, C, H, W)
    confidence, labels = probs.max(dim=1)  # (B, H, W) each
    return torch.where(confidence >= threshold, labels, torch.full_like(labels, ignore_index))


def confident_labels(argmax: Tensor, confidence: Tensor, threshold: float, ignore_index: int = 255, *,
                     class_fraction: float = 0.0, floor: float = 0.0) -> Tensor:
    """Pseudo-labels from a prediction: ``argmax`` where ``confidence >= threshold``, ``ignore_index``
    elsewhere; with ``class_fraction`` > 0 also, per image and class c, the ``ceil(class_fraction *
    n_c)`` most confident of the ``n_c`` pixels predicted as c (ties at the cut pass too) whose
    confidence is at least ``floor``. The class-wise cut is thus ``min(threshold, max(floor, q_c))``
    with q_c the image's (1 - class_fraction) quantile of class c's confidences.

    Args:
        argmax: ``(B, H, W)`` int64 predicted classes.
        confidence: ``(B, H, W)`` float max-softmax of the same pixels (NaN never passes).
        threshold: in (0, 1]; class_fraction in [0, 1]; floor in [0, 1].

    Returns ``(B, H, W)`` int64."""
    _check_threshold(threshold)
    if argmax.shape != confidence.shape or argmax.dim() != 3:
        raise ValueError(f"argmax {tuple(argmax.shape)} and confidence {tuple(confidence.shape)} must be equal (B, H, W)")
    if not 0.0 <= class_fraction <= 1.0:
        raise ValueError(f"class_fraction must be in [0, 1], got {class_fraction!r}")
    if not 0.0 <= floor <= 1.0:
        raise ValueError(f"floor must be in [0, 1], got {floor!r}")
    keep = confidence >= threshold  # (B, H, W)
    if class_fraction > 0:
        for b in range(argmax.shape[0]):
            for c in torch.unique(argmax[b]).tolist():
                of_c = argmax[b] == c  # (H, W)
                values = confidence[b][of_c]  # (n_c,)
                k = max(1, math.ceil(class_fraction * values.numel()))
                cut = max(float(values.topk(k).values[-1]), floor)  # the k-th largest, never under the floor
                keep[b] |= of_c & (confidence[b] >= cut)
    return torch.where(keep, argmax, torch.full_like(argmax, ignore_index))


CONFIDENCE_BINS = 100  # of [0, 1]: medians to 0.01


def confidence_histogram(argmax: Tensor, confidence: Tensor, num_classes: int, bins: int = CONFIDENCE_BINS) -> Tensor:
    """(C, bins) int64: per predicted class, the counts of its pixels' confidence in ``bins`` equal bins
    of [0, 1] (1.0 in the last). Summable over images, steps and ranks (``histogram_medians``)."""
    if argmax.shape != confidence.shape:
        raise ValueError(f"argmax {tuple(argmax.shape)} and confidence {tuple(confidence.shape)} shapes differ")
    a, conf = argmax.flatten().long(), confidence.flatten().float()
    ok = (a >= 0) & (a < num_classes) & ~torch.isnan(conf)
    index = (conf[ok].clamp(0, 1) * bins).long().clamp(max=bins - 1)  # (n,)
    return torch.bincount(a[ok] * bins + index, minlength=num_classes * bins).reshape(num_classes, bins)


def histogram_medians(hist: Tensor) -> list[float]:
    """Per class (row of a ``confidence_histogram``), the median confidence, linearly interpolated
    inside its bin (within 1 / bins of the exact median); NaN for a class with no pixel."""
    hist = torch.as_tensor(hist, dtype=torch.float64)
    bins = hist.shape[1]
    out = []
    for row in hist:
        total = float(row.sum())
        if total == 0:
            out.append(float("nan"))
            continue
        cum = torch.cumsum(row, 0)
        j = int(torch.searchsorted(cum, torch.tensor([total / 2], dtype=torch.float64)).item())
        before = float(cum[j - 1]) if j > 0 else 0.0
        inside = (total / 2 - before) / float(row[j]) if row[j] > 0 else 0.0
        out.append((j + inside) / bins)
    return out


def _logits_of(output: Any) -> Tensor:
    """The logits in a model's output: the tensor itself, the first element of a tuple / list, or
    the ``"logits"`` entry of a dict (models return logits and embeddings)."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    if isinstance(output, dict) and isinstance(output.get("logits"), Tensor):
        return output["logits"]
    raise ValueError(
        f"model output must be a logits tensor, a tuple/list starting with one, or a dict with 'logits'; got {type(output).__name__}"
    )


@torch.no_grad()
def predict_pseudo_labels(
    model: nn.Module,
    images: Tensor,
    threshold: float,
    ignore_index: int = 255,
    batch_size: int = 8,
    with_argmax: bool = False,
    precision: Precision | None = None,
    *,
    class_fraction: float = 0.0,
    floor: float = 0.0,
    with_confidence: bool = False,
) -> Tensor | tuple[Tensor, ...]:
    """Pseudo-label ``images`` with ``model`` in eval mode.

    Args:
        model: returns ``(b, C, H, W)`` logits for ``(b, C_in, H, W)`` images (or a tuple / dict
            holding them, see ``_logits_of``).
        images: ``(N, C_in, H, W)``; batches are moved to the model's device.
        threshold, ignore_index: as in ``pseudo_labels``.
        batch_size: images per forward pass, >= 1.

        with_argmax: also return the plain argmax labels (every pixel), for ``class_coverage``.
        precision: autocast and layout of the forward (``cssl_ray.models.precision``); default fp32.
        class_fraction, floor: the class-wise rule of ``confident_labels`` (0: the threshold alone).
        with_confidence: also return the (N, H, W) float32 max-softmax (after the argmax labels).

    Returns:
        ``(N, H, W)`` int64 on the images' device; ``N = 0`` gives ``(0, H, W)``. With
        ``with_argmax``, the tuple (pseudo-labels, argmax labels); with ``with_confidence`` too,
        (pseudo-labels, argmax labels, confidence).

    The train/eval flag of every submodule is restored afterwards, so a model that was training
    (or had, e.g., frozen batch-norm layers in eval) comes back exactly as it was.
    """
    _check_threshold(threshold)
    if images.dim() != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n, _, h, w = images.shape
    if n == 0:
        empty = torch.empty((0, h, w), dtype=torch.int64, device=images.device)
        extra = [empty.clone()] * with_argmax + [torch.empty((0, h, w), device=images.device)] * with_confidence
        return (empty, *extra) if extra else empty
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else images.device
    prec = precision or FP32
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        out, argmax, confidence = [], [], []
        for start in range(0, n, batch_size):
            batch = prec.layout(images[start : start + batch_size].to(device))
            with prec.autocast():
                logits = _logits_of(model(batch))  # (b, C, H, W)
            if logits.dim() != 4 or logits.shape[0] != batch.shape[0] or logits.shape[2:] != batch.shape[2:]:
                raise ValueError(
                    f"model logits must be (b, C, H, W) = ({batch.shape[0]}, C, {h}, {w}), got shape {tuple(logits.shape)}"
                )
            if 0 <= ignore_index < logits.shape[1]:
                raise ValueError(f"ignore_index {ignore_index} is a class id; use a value < 0 or >= C ({logits.shape[1]})")
            conf, labels = torch.softmax(logits.float(), dim=1).max(dim=1)  # (b, H, W) each; ties: lowest class
            out.append(confident_labels(labels, conf, threshold, ignore_index, class_fraction=class_fraction,
                                        floor=floor).to(images.device))
            argmax.append(labels.to(images.device))
            confidence.append(conf.to(images.device))
    finally:
        for m, training in modes:
            m.training = training
    extra = [torch.cat(argmax)] * with_argmax + [torch.cat(confidence)] * with_confidence
    return (torch.cat(out), *extra) if extra else torch.cat(out)


def rule_of(pseudo: Any) -> dict[str, Any]:
    """``predict_pseudo_labels``' rule arguments (threshold, ignore_index, class_fraction, floor) from a
    ``config.PseudoConfig``."""
    return {"threshold": pseudo.threshold, "ignore_index": pseudo.ignore_index,
            "class_fraction": pseudo.class_fraction, "floor": pseudo.floor}


def merge_with_ground_truth(pseudo: Tensor, gt: Tensor | None) -> Tensor:
    """The labels an image trains with: its ground truth when it has one, else its pseudo-label.

    Args:
        pseudo: ``(B, H, W)`` pseudo-labels.
        gt: ``(B, H, W)`` ground-truth masks of the same images, or None (unlabelled images).

    Returns:
        ``(B, H, W)`` int64: ``gt`` if given (the paper: labelled images use their ground truth),
        else ``pseudo``.
    """
    if gt is None:
        return pseudo.long()
    if gt.shape != pseudo.shape:
        raise ValueError(f"gt shape {tuple(gt.shape)} does not match pseudo shape {tuple(pseudo.shape)}")
    return gt.long()


def coverage(labels: Tensor, ignore_index: int = 255) -> float:
    """Share of pixels in ``labels`` (any shape) that are not ``ignore_index``, in [0, 1].

    An empty tensor has coverage 0.0.
    """
    total = labels.numel()
    if total == 0:
        return 0.0
    return float((labels != ignore_index).sum().item()) / total


def class_coverage(pseudo: Tensor, argmax: Tensor, num_classes: int) -> list[float]:
    """Per class c: the share of the pixels predicted as c (argmax) that are confident enough to be
    pseudo-labelled c, in [0, 1]; NaN for a class no pixel is predicted as.

    A class far under 1% means the threshold is too high for this model: L_CL gets almost no patch
    of it from D_U and L_CR almost no target. ``pseudo``, ``argmax``: equal shapes, as returned by
    ``predict_pseudo_labels(..., with_argmax=True)``.
    """
    predicted, confident = class_counts(pseudo, argmax, num_classes)
    return [float(confident[c]) / float(predicted[c]) if predicted[c] else float("nan") for c in range(num_classes)]


def class_counts(pseudo: Tensor, argmax: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """(C,) int64 counts behind ``class_coverage``: pixels predicted as each class, and those of them
    confident enough to be pseudo-labelled (summable over images and ranks)."""
    if pseudo.shape != argmax.shape:
        raise ValueError(f"pseudo {tuple(pseudo.shape)} and argmax {tuple(argmax.shape)} shapes differ")
    predicted = torch.bincount(argmax.flatten(), minlength=num_classes)[:num_classes]  # (C,)
    confident = torch.bincount(pseudo[pseudo == argmax].flatten(), minlength=num_classes)[:num_classes]  # (C,)
    return predicted, confident
