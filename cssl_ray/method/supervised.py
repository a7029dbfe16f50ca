"""L_sup on labelled pixels: cross-entropy (the paper's), or SSL4MIS's 0.5 (CE + Dice).

    dice_loss        1 - mean over classes of (2 I_c + s) / (Z_c + Y_c + s), softmax scores, whole batch
    supervised_loss  ``train.sup_loss``: "ce" returns the cross-entropy it is given; "ce_dice" 0.5 (CE + Dice)

The Dice term is SSL4MIS's ``DiceLoss`` (HiLab-git/SSL4MIS, code/utils/losses.py), which its 2D
recipes (train_mean_teacher_2D.py, train_cross_pseudo_supervision_2D.py, ...) add to CE as
``0.5 * (loss_ce + loss_dice)``: per class c, over every pixel of the batch, I_c = sum p_c y_c,
Z_c = sum p_c^2, Y_c = sum y_c^2 (V-Net's squared form), s = 1e-5, each class (background too)
weighted 1 / C. Pixels at ``ignore_index`` count in no sum.

A rare class (a micronucleus, 0.2% of the pixels) adds a whole 1 / C of the Dice term, where it adds
0.2% of the CE: that is why SSL4MIS's recipes train small structures a plain CE leaves at background.

Data parallel (``collectives``): the per-class sums are gathered with their gradients and added over
ranks, so every rank computes the Dice of the global batch and, after the gradient average, the step
is one process's step on the global batch (the CE it is given is already the global mean).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from cssl_ray.method.collectives import Collectives

SUP_LOSSES = ("ce", "ce_dice")
DICE_SMOOTH = 1e-5  # SSL4MIS's smooth


def dice_loss(logits: Tensor, target: Tensor, ignore_index: int, collectives: Collectives | None = None) -> Tensor:
    """SSL4MIS's soft Dice loss of ``logits`` (B, C, H, W) against ``target`` (B, H, W) class indices,
    over the (global) batch, pixels at ``ignore_index`` left out (module docstring)."""
    if logits.ndim != 4 or target.shape != (logits.shape[0], *logits.shape[2:]):
        raise ValueError(f"dice_loss: logits must be (B, C, H, W) and target (B, H, W), got "
                         f"{tuple(logits.shape)} and {tuple(target.shape)}")
    col = collectives or Collectives()
    c = logits.shape[1]
    valid = (target != ignore_index).unsqueeze(1).to(logits.dtype)  # (B, 1, H, W)
    score = logits.float().softmax(1) * valid
    onehot = F.one_hot(torch.where(target == ignore_index, 0, target), c).permute(0, 3, 1, 2).to(score.dtype) * valid
    dims = (0, 2, 3)
    sums = torch.stack([(score * onehot).sum(dims), (score * score).sum(dims), (onehot * onehot).sum(dims)])
    if col.world_size > 1:
        sums = col.gather_with_grad(sums.unsqueeze(0)).sum(0)  # (3, C): every rank's pixels
    intersect, z_sum, y_sum = sums
    return 1.0 - ((2.0 * intersect + DICE_SMOOTH) / (z_sum + y_sum + DICE_SMOOTH)).mean()


def supervised_loss(ce: Tensor, logits: Tensor, target: Tensor, ignore_index: int, kind: str,
                    collectives: Collectives | None = None) -> Tensor:
    """L_sup of ``train.sup_loss`` ``kind`` from the step's cross-entropy ``ce`` (its global mean):
    "ce" is ``ce`` itself; "ce_dice" is 0.5 (ce + dice_loss(logits, target))."""
    if kind == "ce":
        return ce
    if kind == "ce_dice":
        return 0.5 * (ce + dice_loss(logits, target, ignore_index, collectives))
    raise ValueError(f"train.sup_loss: {kind!r} is not one of {', '.join(SUP_LOSSES)}")
