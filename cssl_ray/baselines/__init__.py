"""Semi-supervised baselines, the pure-PyTorch building blocks (GitHub issue 11).

    mean_teacher   Mean Teacher (Tarvainen & Valpola 2017): EMA teacher, sigmoid ramp-up,
                   softmax MSE consistency, clamped Gaussian input noise (as in SSL4MIS)
    cps            Cross Pseudo Supervision (Chen et al., CVPR 2021): two networks trained on each
                   other's argmax pseudo-labels
    simclr         SimCLR (Chen et al., ICML 2020): NT-Xent, two augmented views of grayscale
                   images, pooled-encoder projections
    pseudo_label   self-training on pseudo-labels (Lee 2013): the loss consuming
                   ``cssl_ray.method.pseudo_labels.predict_pseudo_labels``

Only losses, schedules and augmentations live here; training loops are the caller's.
"""
from __future__ import annotations

from cssl_ray.baselines.cps import cps_loss
from cssl_ray.baselines.mean_teacher import consistency_weight, ema_update, mean_teacher_loss, noisy, sigmoid_rampup
from cssl_ray.baselines.pseudo_label import self_training_loss
from cssl_ray.baselines.simclr import ProjectionMLP, deepest_channels, image_embedding, nt_xent, two_views

__all__ = [
    "ProjectionMLP",
    "consistency_weight",
    "cps_loss",
    "deepest_channels",
    "ema_update",
    "image_embedding",
    "mean_teacher_loss",
    "noisy",
    "nt_xent",
    "self_training_loss",
    "sigmoid_rampup",
    "two_views",
]
