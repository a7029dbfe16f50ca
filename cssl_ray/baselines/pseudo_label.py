"""Self-training on pseudo-labels (Lee, "Pseudo-Label: The Simple and Efficient Semi-Supervised
Learning Method for Deep Neural Networks", ICML 2013 Workshop on Challenges in Representation
Learning), the softmax baseline of Pandey et al. (MICCAI 2021).

A network trained on the labelled images predicts the unlabelled ones; the predicted classes are
then used as if they were true labels, with the cross-entropy of the labelled images:

    L = CE(f(x_l), y_l) + alpha(t) * CE(f(x_u), y_hat_u)

Lee takes the argmax of every pixel; here the pseudo-labels come from
``cssl_ray.method.pseudo_labels.predict_pseudo_labels`` (confident argmax, ``ignore_index`` below the
threshold), so a threshold <= 1/C reproduces Lee's plain argmax and higher thresholds give the
confident variant. This module only holds the loss that consumes them; no ground truth enters it.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def self_training_loss(logits: Tensor, pseudo: Tensor, ignore_index: int = 255) -> Tensor:
    """Mean cross-entropy over the pixels whose pseudo-label is not ``ignore_index``, a scalar.

    Args:
        logits: (B, C, H, W) predictions of the network being trained (float32 CE).
        pseudo: (B, H, W) integer pseudo-labels, e.g. ``predict_pseudo_labels(...)``; values in
            [0, C) or ``ignore_index``.
        ignore_index: label of the uncovered pixels (default 255, as in ``pseudo_labels``).

    No covered pixel (every pseudo-label is ``ignore_index``, or B = 0): ``logits.sum() * 0``, a
    zero connected to the graph, never NaN.
    """
    if (logits.dim() != 4 or pseudo.dim() != 3 or logits.shape[0] != pseudo.shape[0]
            or logits.shape[2:] != pseudo.shape[1:]):
        raise ValueError(f"self_training_loss: logits (B, C, H, W) and pseudo (B, H, W) must agree, got "
                         f"{tuple(logits.shape)} and {tuple(pseudo.shape)}")
    if pseudo.is_floating_point():
        raise ValueError(f"self_training_loss: pseudo must be integer labels, got dtype {pseudo.dtype}")
    if not bool((pseudo != ignore_index).any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float(), pseudo.long(), ignore_index=ignore_index)
