"""Per-image boundary metrics: HD95 and ASD, and per-image Dice, averaged over a dataset's images.

Medical segmentation papers report, per image and per foreground class, the 95th-percentile
Hausdorff distance (HD95), the average surface distance (ASD) and Dice, then the mean over images.
``cssl_ray.evaluation.metrics`` pools Dice / IoU over all pixels instead; this module adds the per-image view.
Per-image Dice lives here, not there, because it shares the per-image loop and the empty-mask
convention with the distances.

Distances are in **pixels of the evaluated image**: the images are resized when prepared and their
physical spacing is not known, so no millimetres. Lower is better.

Definitions (MONAI's ``compute_hausdorff_distance(percentile=95)`` and
``compute_average_surface_distance(symmetric=True)`` without spacing, which the tests check):
    - surface S(M) of a binary mask M: M minus its binary erosion by the 4-connected cross
      (``scipy.ndimage.binary_erosion``'s default structure), pixels outside the image counting as
      background, so mask pixels on the image border are surface pixels;
    - d(P -> G): for each pixel of S(P), the Euclidean distance to the nearest pixel of S(G)
      (``distance_transform_edt`` of the complement of S(G));
    - HD95 = max(q95(d(P -> G)), q95(d(G -> P))): the larger of the two directed 95th
      percentiles, q95 with linear interpolation (``numpy.quantile``, as ``torch.quantile``);
    - ASD = mean of d(P -> G) and d(G -> P) pooled: (sum d(P -> G) + sum d(G -> P)) / (|S(P)| + |S(G)|);
    - Dice = 2 |P & G| / (|P| + |G|).

Degenerate cases, per image and class:
    - both masks empty: HD95, ASD and Dice are NaN (nothing to score) and the image does not count
      towards that class's means, as for the pooled Dice;
    - exactly one mask empty (a missed or a hallucinated object): HD95 = ASD = the image diagonal
      sqrt((H - 1)^2 + (W - 1)^2), the largest distance two pixels of the image can have, so the
      miss is scored as badly as any prediction could be and the means stay finite; Dice = 0.
      MONAI gives inf here. The accumulator counts these images (``surface_one_empty/<class>``).

Pixels whose target is ``ignore_index`` (255, the pseudo-label "ignore") belong to neither mask:
they count as background of both the prediction and the target (so a region touching them has its
surface there).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor

from cssl_ray.evaluation.metrics import check_state


def surface(mask: np.ndarray) -> np.ndarray:
    """Boundary pixels of a binary mask: ``mask`` minus its erosion (4-connected cross, outside
    the image = background). Any shape; returns bool of the same shape."""
    mask = np.asarray(mask, dtype=bool)
    return mask & ~ndimage.binary_erosion(mask)


def worst_distance(shape: tuple[int, ...]) -> float:
    """The image diagonal sqrt(sum (n - 1)^2): the largest distance between two pixels of an image
    of ``shape``; the HD95 and ASD given when exactly one mask is empty."""
    return math.sqrt(sum((n - 1) ** 2 for n in shape))


def surface_distances(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances (d(P -> G), d(G -> P)) between two non-empty binary masks.

    Args:
        pred, gt: binary masks of the same shape (H, W), each with at least one pixel.

    Returns:
        (|S(P)|,) and (|S(G)|,) float64 arrays: each surface pixel's distance, in pixels, to the
        nearest surface pixel of the other mask.

    Raises:
        ValueError: shapes differ or a mask is empty (the distances are undefined).
    """
    pred, gt = np.asarray(pred, dtype=bool), np.asarray(gt, dtype=bool)
    if pred.shape != gt.shape:
        raise ValueError(f"pred and gt must have the same shape, got {pred.shape} and {gt.shape}")
    if not pred.any() or not gt.any():
        raise ValueError("surface distances need two non-empty masks (see image_scores for empty ones)")
    s_pred, s_gt = surface(pred), surface(gt)
    # Crop to the surfaces' bounding box: every surface pixel lies inside it, so the nearest one
    # found there is the nearest one in the image, and the EDTs cost the objects' size, not the image's.
    box = tuple(slice(idx.min(), idx.max() + 1) for idx in np.nonzero(s_pred | s_gt))
    s_pred, s_gt = s_pred[box], s_gt[box]
    to_gt = ndimage.distance_transform_edt(~s_gt)  # (h, w) distance of each pixel to S(G)
    to_pred = ndimage.distance_transform_edt(~s_pred)  # (h, w) distance of each pixel to S(P)
    return to_gt[s_pred], to_pred[s_gt]


def image_scores(pred: np.ndarray, gt: np.ndarray) -> tuple[float, float, float]:
    """(HD95, ASD, Dice) of one image's binary masks of one class (see the module docstring).

    Both empty: (nan, nan, nan). Exactly one empty: (diagonal, diagonal, 0.0) with
    ``worst_distance(shape)``.
    """
    pred, gt = np.asarray(pred, dtype=bool), np.asarray(gt, dtype=bool)
    if pred.shape != gt.shape:
        raise ValueError(f"pred and gt must have the same shape, got {pred.shape} and {gt.shape}")
    n_pred, n_gt = int(pred.sum()), int(gt.sum())
    if n_pred == 0 and n_gt == 0:
        return math.nan, math.nan, math.nan
    if n_pred == 0 or n_gt == 0:
        worst = worst_distance(pred.shape)
        return worst, worst, 0.0
    d_pg, d_gp = surface_distances(pred, gt)
    hd95 = max(float(np.quantile(d_pg, 0.95)), float(np.quantile(d_gp, 0.95)))
    asd = float((d_pg.sum() + d_gp.sum()) / (d_pg.size + d_gp.size))
    dice = 2 * int((pred & gt).sum()) / (n_pred + n_gt)
    return hd95, asd, dice


class SurfaceMetrics:
    """Per-image HD95, ASD and Dice per foreground class, averaged over images, from summable state.

    Usage as ``metrics.SegmentationMetrics``: ``update`` every batch; to combine ranks, all-reduce
    (sum) each tensor of ``state()`` and ``merge_state`` the result into a fresh (or ``reset``)
    accumulator; then ``compute``. The state is on the CPU (the distances are computed there with
    scipy); a merged result equals a one-shot one up to float64 rounding of the sums.

    Cost: two distance transforms per image and foreground class on the CPU; call it on the test
    set, not every validation.

    ``compute`` keys, foreground classes only (names from ``class_names``; default "class_1", ...):
        hd95/<name>, asd/<name>, dice_image/<name>   mean over the images where the class is in the
                                                   prediction or the target; NaN if in none
        hd95_mean, asd_mean, dice_image_mean       nanmean of those over the foreground classes
        surface_one_empty/<name>                   images where exactly one of prediction and target
                                                   has the class (scored at the image diagonal)
    """

    def __init__(self, num_classes: int, ignore_index: int | None = 255, class_names: list[str] | None = None) -> None:
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 (background + foreground), got {num_classes}")
        if class_names is None:
            class_names = ["background"] + [f"class_{c}" for c in range(1, num_classes)]
        if len(class_names) != num_classes or len(set(class_names)) != num_classes:
            raise ValueError(f"class_names must be {num_classes} distinct names, got {list(class_names)}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.class_names = list(class_names)
        self.reset()

    def reset(self) -> None:
        """Zero every sum and count."""
        c = self.num_classes
        self._sums = torch.zeros(3, c, dtype=torch.float64)  # rows: HD95, ASD, Dice summed over scored images
        self._scored = torch.zeros(c, dtype=torch.int64)  # images with the class in pred or target
        self._one_empty = torch.zeros(c, dtype=torch.int64)  # ... in exactly one of them

    @torch.no_grad()
    def update(self, logits_or_pred: Tensor, target: Tensor) -> None:
        """Add one batch.

        Args:
            logits_or_pred: (B, C, H, W) float logits (argmax -> prediction) or (B, H, W) integer
                predictions in [0, C).
            target: (B, H, W) integer classes in [0, C) or ``ignore_index``.

        Raises:
            ValueError: shapes do not match, the channel count is not C, or a class outside [0, C).
        """
        x = logits_or_pred
        if x.dtype.is_floating_point:
            if x.dim() != 4 or x.shape[1] != self.num_classes:
                raise ValueError(f"logits must be (B, C={self.num_classes}, H, W), got {tuple(x.shape)}")
            x = x.argmax(1)  # (B, H, W)
        if x.dim() != 3 or x.shape != target.shape:
            raise ValueError(
                f"predictions must be (B, H, W) like target; got {tuple(logits_or_pred.shape)}, "
                f"target {tuple(target.shape)}"
            )
        pred = x.cpu().numpy()  # (B, H, W)
        tgt = target.cpu().numpy()
        keep = np.ones_like(tgt, dtype=bool) if self.ignore_index is None else tgt != self.ignore_index
        for name, arr, valid in (("pred", pred, np.ones_like(keep)), ("target", tgt, keep)):
            bad = arr[valid & ((arr < 0) | (arr >= self.num_classes))]
            if bad.size:
                raise ValueError(f"{name} holds class {int(bad[0])}, outside [0, {self.num_classes})")
        for b in range(pred.shape[0]):
            for c in range(1, self.num_classes):
                p, g = (pred[b] == c) & keep[b], tgt[b] == c  # (H, W) each; ignored pixels in neither
                p_any, g_any = bool(p.any()), bool(g.any())
                if not (p_any or g_any):
                    continue  # nothing to score: NaN, left out of the means
                self._sums[:, c] += torch.tensor(image_scores(p, g), dtype=torch.float64)
                self._scored[c] += 1
                self._one_empty[c] += int(p_any != g_any)

    def state(self) -> dict[str, Tensor]:
        """Copies of the summable state: "sums" (3, C) float64 (HD95, ASD, Dice), "scored" and
        "one_empty" (C,) int64."""
        return {"sums": self._sums.clone(), "scored": self._scored.clone(), "one_empty": self._one_empty.clone()}

    def merge_state(self, other: dict[str, Tensor]) -> None:
        """Add another accumulator's ``state()`` (same C)."""
        check_state(self.state(), other)
        self._sums += other["sums"].to("cpu", torch.float64)
        self._scored += other["scored"].to("cpu", torch.int64)
        self._one_empty += other["one_empty"].to("cpu", torch.int64)

    def compute(self) -> dict[str, float]:
        """Metrics over everything accumulated (see the class docstring for the keys)."""
        n = self._scored.to(torch.float64)
        means = torch.where(n > 0, self._sums / n.clamp_min(1), float("nan"))  # (3, C)
        out: dict[str, float] = {}
        for row, key in enumerate(("hd95", "asd", "dice_image")):
            for c, name in enumerate(self.class_names[1:], start=1):
                out[f"{key}/{name}"] = float(means[row, c])
            out[f"{key}_mean"] = float(means[row, 1:].nanmean())
        for c, name in enumerate(self.class_names[1:], start=1):
            out[f"surface_one_empty/{name}"] = float(self._one_empty[c])
        return out
