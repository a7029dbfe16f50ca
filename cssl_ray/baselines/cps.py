"""Cross Pseudo Supervision (Chen et al., "Semi-Supervised Semantic Segmentation with Cross Pseudo
Supervision", CVPR 2021).

Two networks f_a, f_b of the same architecture, initialised differently, see the same images. Each
is trained on the other's hard pseudo-labels, the per-pixel argmax of the other's logits, with
plain cross-entropy; the argmax is not differentiable, so no gradient flows into the network that
produced a pseudo-label. The paper uses no confidence threshold: every pixel is pseudo-labelled.

    L_cps = CE(p_a, argmax p_b) + CE(p_b, argmax p_a)      (mean over pixels, each term)
    L = L_sup(a) + L_sup(b) + lambda_ * L_cps              (paper: lambda_ 1.5 on VOC, 6 on Cityscapes)

On labelled images the paper adds L_cps as well (it is computed on every image of the batch).
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def _cross_entropy(logits: Tensor, target: Tensor, ignore_index: int) -> Tensor:
    """Mean CE over the pixels whose target is not ``ignore_index``; a graph-connected 0 if none."""
    if not bool((target != ignore_index).any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float(), target, ignore_index=ignore_index)


def cps_loss(logits_a: Tensor, logits_b: Tensor, ignore_index: int | None = None) -> Tensor:
    """L_cps = CE(logits_a, argmax logits_b) + CE(logits_b, argmax logits_a), a scalar.

    Args:
        logits_a, logits_b: (B, C, H, W) logits of the two networks on the same images.
        ignore_index: passed to the cross-entropy. The targets are argmaxes in [0, C), so only a
            class id has an effect: pixels the *other* network labels with that class are left out
            of the term (e.g. a void class). None: every pixel counts, as in the paper.

    Each term is a mean over its counted pixels (computed in float32); a term with no counted pixel
    is a graph-connected zero, never NaN. The gradient w.r.t. ``logits_a`` comes only from the first
    term, where a is the student.
    """
    if logits_a.shape != logits_b.shape or logits_a.dim() != 4:
        raise ValueError(f"cps_loss: logits_a and logits_b must both be (B, C, H, W), got "
                         f"{tuple(logits_a.shape)} and {tuple(logits_b.shape)}")
    ignore = -100 if ignore_index is None else ignore_index  # F.cross_entropy's "none"
    y_a = logits_a.detach().argmax(dim=1)  # (B, H, W) hard pseudo-labels of a
    y_b = logits_b.detach().argmax(dim=1)  # (B, H, W) hard pseudo-labels of b
    return _cross_entropy(logits_a, y_b, ignore) + _cross_entropy(logits_b, y_a, ignore)
