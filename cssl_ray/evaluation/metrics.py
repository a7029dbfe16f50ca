"""Segmentation metrics: per-class and mean Dice, IoU and AUPRC, accumulated over a dataset.

C classes, class 0 is background; "foreground" = classes 1..C-1. Every accumulated quantity is a
plain integer count tensor (a (C, C) confusion matrix and, for AUPRC, (C, bins) histograms of
the predicted probability of positive and negative pixels), so accumulators on several workers
combine by summing their ``state()`` (an all-reduce) and ``merge_state``. Call that on every
rank; compute on any.

Conventions:
    - confusion matrix rows = target class, columns = predicted class;
    - pixels whose target equals ``ignore_index`` (default 255, the pseudo-label "ignore") are
      skipped everywhere;
    - Dice = 2TP / (2TP + FP + FN), IoU = TP / (TP + FP + FN); NaN for a class absent from both
      target and prediction (nothing to score), excluded from the means;
    - AUPRC of a foreground class = average precision, one-vs-rest on its softmax probability:
      AP = sum_n (R_n - R_{n-1}) P_n with thresholds at the histogram's bin edges (the same
      step-wise sum as ``sklearn.metrics.average_precision_score``, which it equals exactly when
      each bin holds one distinct probability). NaN for a class with no positive pixel.
"""
from __future__ import annotations

import torch
from torch import Tensor


def _check_int(x: Tensor, name: str) -> None:
    if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor of class indices, got dtype {x.dtype}")


def _check_range(x: Tensor, num_classes: int, name: str) -> None:
    bad = x[(x < 0) | (x >= num_classes)]
    if bad.numel() > 0:
        raise ValueError(
            f"{name} holds class {int(bad[0])}, outside [0, {num_classes}) "
            f"(num_classes = {num_classes})"
        )


def _keep_mask(target: Tensor, ignore_index: int | None) -> Tensor:
    """(P,) flattened target -> (P,) bool, False at ignored pixels."""
    if ignore_index is None:
        return torch.ones_like(target, dtype=torch.bool)
    return target != ignore_index


def confusion_matrix(
    pred: Tensor, target: Tensor, num_classes: int, ignore_index: int | None = 255
) -> Tensor:
    """Confusion matrix of integer predictions against integer targets.

    Args:
        pred: predicted classes, any shape (usually (B, H, W)), integer dtype, all in [0, C).
        target: true classes, the same shape, integer dtype, in [0, C) or ``ignore_index``.
        num_classes: C >= 1.
        ignore_index: target value whose pixels are skipped; None skips nothing.

    Returns:
        (C, C) int64 on the inputs' device; entry [t, p] counts pixels of target t predicted p.
        Empty inputs (or all pixels ignored) give zeros.

    Raises:
        ValueError: shapes differ, non-integer dtype, C < 1, or a class outside [0, C) in
            ``pred`` (anywhere) or in ``target`` (other than ``ignore_index``).
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if pred.shape != target.shape:
        raise ValueError(
            f"pred and target must have the same shape, got pred {tuple(pred.shape)}, "
            f"target {tuple(target.shape)}"
        )
    _check_int(pred, "pred")
    _check_int(target, "target")
    pred = pred.reshape(-1).long()  # (P,)
    target = target.reshape(-1).long()  # (P,)
    _check_range(pred, num_classes, "pred")
    keep = _keep_mask(target, ignore_index)
    pred, target = pred[keep], target[keep]
    _check_range(target, num_classes, "target")
    flat = torch.bincount(target * num_classes + pred, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes)


def _check_confusion(cm: Tensor) -> None:
    if cm.dim() != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"confusion matrix must be (C, C), got shape {tuple(cm.shape)}")


def _tp_fp_fn(cm: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    _check_confusion(cm)
    cm = cm.to(torch.float64)
    tp = cm.diagonal()  # (C,)
    return tp, cm.sum(0) - tp, cm.sum(1) - tp  # predicted-not-true, true-not-predicted


def dice_from_confusion(cm: Tensor) -> Tensor:
    """(C, C) confusion (rows = target) -> (C,) float64 Dice 2TP / (2TP + FP + FN).

    NaN where the class is absent from both target and prediction (0 / 0).
    """
    tp, fp, fn = _tp_fp_fn(cm)
    denom = 2 * tp + fp + fn
    return torch.where(denom > 0, 2 * tp / denom.clamp_min(1), float("nan"))


def iou_from_confusion(cm: Tensor) -> Tensor:
    """(C, C) confusion (rows = target) -> (C,) float64 IoU TP / (TP + FP + FN).

    NaN where the class is absent from both target and prediction (0 / 0).
    """
    tp, fp, fn = _tp_fp_fn(cm)
    denom = tp + fp + fn
    return torch.where(denom > 0, tp / denom.clamp_min(1), float("nan"))


def pr_histograms(
    probs: Tensor, target: Tensor, bins: int = 1000, ignore_index: int | None = 255
) -> tuple[Tensor, Tensor]:
    """Per-class histograms of class probabilities at positive and at negative pixels.

    Args:
        probs: (B, C, *S) class probabilities in [0, 1] (e.g. softmax over dim 1), float.
        target: (B, *S) integer classes in [0, C) or ``ignore_index`` (those pixels skipped).
        bins: number of equal bins over [0, 1]; bin j holds [j / bins, (j + 1) / bins), the
            last one also holds 1.0.

    Returns:
        (pos, neg), each (C, bins) int64: pos[c, j] counts pixels of class c whose probability
        of class c falls in bin j; neg[c, j] the same for pixels of any other class.

    Raises:
        ValueError: shapes do not match, or a target class outside [0, C).
    """
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    if probs.dim() < 2 or target.shape != probs.shape[:1] + probs.shape[2:]:
        raise ValueError(
            f"probs must be (B, C, *S) and target (B, *S); got probs {tuple(probs.shape)}, "
            f"target {tuple(target.shape)}"
        )
    _check_int(target, "target")
    c = probs.shape[1]
    p = probs.movedim(1, -1).reshape(-1, c)  # (P, C)
    t = target.reshape(-1).long()  # (P,)
    keep = _keep_mask(t, ignore_index)
    p, t = p[keep], t[keep]
    _check_range(t, c, "target")
    p = p.to(torch.promote_types(p.dtype, torch.float32))  # half precision would merge bins
    idx = (p * bins).floor_().long().clamp_(0, bins - 1)  # (P, C) bin of each probability
    classes = torch.arange(c, device=t.device)
    is_pos = (t[:, None] == classes).long()  # (P, C)
    key = (is_pos * c + classes) * bins + idx  # (P, C) flat index into (2, C, bins)
    counts = torch.bincount(key.reshape(-1), minlength=2 * c * bins).reshape(2, c, bins)
    return counts[1], counts[0]


def average_precision_from_histograms(pos: Tensor, neg: Tensor) -> Tensor:
    """(C, bins) positive / negative histograms -> (C,) float64 average precision.

    Thresholds at the bin edges, from the top bin down: R_n and P_n are the recall and
    precision of "probability in bin >= n"; AP = sum_n (R_n - R_{n-1}) P_n. NaN for a class with
    no positives (recall undefined).
    """
    if pos.shape != neg.shape or pos.dim() != 2:
        raise ValueError(
            f"pos and neg must both be (C, bins), got {tuple(pos.shape)} and {tuple(neg.shape)}"
        )
    pos = pos.to(torch.float64).flip(1)  # (C, bins) highest probability first
    neg = neg.to(torch.float64).flip(1)
    tp = pos.cumsum(1)
    fp = neg.cumsum(1)
    precision = tp / (tp + fp).clamp_min(1)  # where tp + fp = 0, pos = 0 so the term is 0 anyway
    n_pos = tp[:, -1]  # (C,)
    ap = (pos * precision).sum(1) / n_pos.clamp_min(1)  # recall steps by pos / n_pos
    return torch.where(n_pos > 0, ap, float("nan"))


def check_state(mine: dict[str, Tensor], other: dict[str, Tensor]) -> None:
    """``other`` must be a ``state()`` of the same accumulator kind and size as ``mine``."""
    if set(other) != set(mine):
        raise ValueError(f"state keys {sorted(other)} do not match {sorted(mine)}")
    for key, value in mine.items():
        if other[key].shape != value.shape:
            raise ValueError(f"state[{key!r}] has shape {tuple(other[key].shape)}, expected {tuple(value.shape)}")


class SegmentationMetrics:
    """Dataset-level Dice, IoU and (optionally) AUPRC from a summable confusion state.

    Usage (per rank): ``update`` every batch; to combine ranks, all-reduce (sum) each tensor of
    ``state()`` and ``merge_state`` the result into a fresh (or ``reset``) accumulator; then
    ``compute``. The state lives on the device of the latest ``update`` (so NCCL can reduce it).

    ``compute`` keys (names from ``class_names``; default "background", "class_1", ...):
        dice/<name>, iou/<name>    every class, NaN where absent from target and prediction
        dice_mean, iou_mean        nanmean over foreground classes 1..C-1 (NaN if all absent)
        auprc/<name>, auprc_mean   foreground classes only, when ``auprc=True``; NaN for a class
                                   with no positive pixel, excluded from the mean
    """

    def __init__(
        self,
        num_classes: int,
        ignore_index: int | None = 255,
        class_names: list[str] | None = None,
        auprc: bool = False,
        auprc_bins: int = 1000,
    ) -> None:
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 (background + foreground), got {num_classes}")
        if class_names is None:
            class_names = ["background"] + [f"class_{c}" for c in range(1, num_classes)]
        if len(class_names) != num_classes or len(set(class_names)) != num_classes:
            raise ValueError(
                f"class_names must be {num_classes} distinct names, got {list(class_names)}"
            )
        if auprc_bins < 1:
            raise ValueError(f"auprc_bins must be >= 1, got {auprc_bins}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.class_names = list(class_names)
        self.auprc = auprc
        self.auprc_bins = auprc_bins
        self.reset()

    def reset(self) -> None:
        """Zero every count (keeps the device)."""
        device = self._confusion.device if hasattr(self, "_confusion") else torch.device("cpu")
        c, bins = self.num_classes, self.auprc_bins
        self._confusion = torch.zeros(c, c, dtype=torch.int64, device=device)
        if self.auprc:
            self._pos = torch.zeros(c, bins, dtype=torch.int64, device=device)
            self._neg = torch.zeros(c, bins, dtype=torch.int64, device=device)

    def _to(self, device: torch.device) -> None:
        if self._confusion.device != device:
            self._confusion = self._confusion.to(device)
            if self.auprc:
                self._pos, self._neg = self._pos.to(device), self._neg.to(device)

    @torch.no_grad()
    def update(self, logits_or_pred: Tensor, target: Tensor) -> None:
        """Add one batch.

        Args:
            logits_or_pred: (B, C, H, W) float logits (argmax -> prediction; softmax ->
                probabilities for AUPRC), or (B, H, W) integer predictions (only without AUPRC).
                Any spatial shape *S works in place of (H, W).
            target: (B, H, W) integer classes in [0, C) or ``ignore_index``.

        Raises:
            ValueError: shapes do not match, the channel count is not C, integer predictions
                with ``auprc=True``, or a class outside [0, C).
        """
        x = logits_or_pred
        if x.dtype.is_floating_point:
            if x.dim() != target.dim() + 1 or x.shape[:1] + x.shape[2:] != target.shape:
                raise ValueError(
                    f"logits must be (B, C, *S) with target (B, *S); got logits "
                    f"{tuple(x.shape)}, target {tuple(target.shape)}"
                )
            if x.shape[1] != self.num_classes:
                raise ValueError(
                    f"logits have {x.shape[1]} channels, expected num_classes = "
                    f"{self.num_classes}; logits shape {tuple(x.shape)}"
                )
            pred = x.argmax(1)  # (B, *S)
        else:
            if self.auprc:
                raise ValueError(
                    "auprc=True needs (B, C, *S) float logits, got integer predictions of shape "
                    f"{tuple(x.shape)}"
                )
            pred = x
        cm = confusion_matrix(pred, target, self.num_classes, self.ignore_index)
        if self.auprc:
            probs = x.float().softmax(1)  # (B, C, *S)
            pos, neg = pr_histograms(probs, target, self.auprc_bins, self.ignore_index)
        self._to(cm.device)
        self._confusion += cm
        if self.auprc:
            self._pos += pos
            self._neg += neg

    def state(self) -> dict[str, Tensor]:
        """Copies of the summable counts: "confusion" (C, C), and with AUPRC "auprc_pos" and
        "auprc_neg" (C, bins); all int64."""
        out = {"confusion": self._confusion.clone()}
        if self.auprc:
            out["auprc_pos"] = self._pos.clone()
            out["auprc_neg"] = self._neg.clone()
        return out

    def merge_state(self, other: dict[str, Tensor]) -> None:
        """Add another accumulator's ``state()`` (same C, bins and ``auprc`` setting)."""
        check_state(self.state(), other)
        device = self._confusion.device
        self._confusion += other["confusion"].to(device=device, dtype=torch.int64)
        if self.auprc:
            self._pos += other["auprc_pos"].to(device=device, dtype=torch.int64)
            self._neg += other["auprc_neg"].to(device=device, dtype=torch.int64)

    def compute(self) -> dict[str, float]:
        """Metrics over everything accumulated (see the class docstring for the keys)."""
        out: dict[str, float] = {}
        dice = dice_from_confusion(self._confusion).cpu()
        iou = iou_from_confusion(self._confusion).cpu()
        for c, name in enumerate(self.class_names):
            out[f"dice/{name}"] = float(dice[c])
            out[f"iou/{name}"] = float(iou[c])
        out["dice_mean"] = float(dice[1:].nanmean())
        out["iou_mean"] = float(iou[1:].nanmean())
        if self.auprc:
            ap = average_precision_from_histograms(self._pos, self._neg).cpu()
            for c, name in enumerate(self.class_names[1:], start=1):
                out[f"auprc/{name}"] = float(ap[c])
            out["auprc_mean"] = float(ap[1:].nanmean())
        return out
