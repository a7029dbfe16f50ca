"""Consistency regularisation (the paper's L_CR) with silhouette-scaled feature noise.

Legend (defaults in ``cssl_ray.config.ConsistencyConfig``):

    h        E(x_u): the current encoder's features of unlabelled images; ``h[-1]`` is the bottleneck
    omega    silhouette of the last epoch's patch embeddings, in [-1, 1]
    eps      small offset >= 0 (default 0.01)
    lambda_  (omega + 1) / 2 + eps, the VARIANCE of the noise r ~ N(0, lambda_ I); std = sqrt(lambda_)
             (``noise: absolute``, the paper's letter), or of r ~ N(0, lambda_ Var_c(h)) relative to
             each channel's own variance over the batch (``noise: relative``; docs/science.md says why)
    h_hat    h + r, on the bottleneck only (default) or on every level (``perturb: all_levels``)
    y        D_prev(h): the teacher's (previous network's) prediction, no gradient
    y_hat    D(h_hat): the current decoder's prediction from perturbed features

    L_CR = 1/B sum_l H(y_l, y_hat_l), y as hard targets where the teacher's softmax confidence
    reaches the pseudo-label threshold; other pixels are ignored.

The released code read lambda with ``K.get_value`` inside ``call`` so it froze at its first value;
here ``lambda_`` is an argument of every step, so the noise actually follows omega.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cssl_ray.method.collectives import Collectives
from cssl_ray.method.pseudo_labels import pseudo_labels

PERTURB_MODES = ("bottleneck", "all_levels")
NOISE_SCALES = ("absolute", "relative")


def noise_variance(omega: float, eps: float) -> float:
    """lambda_ = (omega + 1) / 2 + eps; omega in [-1, 1] gives lambda_ in [eps, 1 + eps]."""
    if not -1.0 - 1e-6 <= omega <= 1.0 + 1e-6 or math.isnan(omega):
        raise ValueError(f"omega must be in [-1, 1], got {omega}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    return (omega + 1.0) / 2.0 + eps


def perturb(feats: list[Tensor], lambda_: float, mode: str = "bottleneck",
            generator: torch.Generator | None = None, scale: str = "absolute") -> list[Tensor]:
    """h_hat = h + r on the bottleneck (last element) or on every level.

    scale "absolute": r ~ N(0, lambda_ I). scale "relative": r ~ N(0, lambda_ Var_c(h)), where
    Var_c(h) is the variance of channel c of h over the batch and the pixels (B, H, W), detached,
    so lambda_ is a noise-to-signal ratio whatever the features' scale.
    ``feats`` is the encoder's list, fine to coarse; a new list is returned and the inputs are not
    modified. Gradients flow through h_hat into the encoder (not through the variance).
    """
    if mode not in PERTURB_MODES:
        raise ValueError(f"perturb mode {mode!r} is unknown; choose one of {', '.join(PERTURB_MODES)}")
    if scale not in NOISE_SCALES:
        raise ValueError(f"noise scale {scale!r} is unknown; choose one of {', '.join(NOISE_SCALES)}")
    if lambda_ < 0:
        raise ValueError(f"lambda_ (a variance) must be >= 0, got {lambda_}")
    first = len(feats) - 1 if mode == "bottleneck" else 0
    out = list(feats)
    for i in range(first, len(feats)):
        h = feats[i]
        # A CPU generator keeps runs reproducible across devices; draw there and move.
        gen_device = generator.device if generator is not None else h.device
        noise = torch.randn(h.shape, generator=generator, device=gen_device, dtype=h.dtype).to(h.device)
        if scale == "relative":  # (1, C, 1, 1) per-channel std of the batch, no gradient
            std = (lambda_ * h.detach().float().var(dim=(0, 2, 3), unbiased=False, keepdim=True)).sqrt().to(h.dtype)
        else:
            std = math.sqrt(lambda_)
        out[i] = h + std * noise
    return out


def consistency_loss(teacher_logits: Tensor, student_logits: Tensor, threshold: float,
                     ignore_index: int = 255) -> Tensor:
    """Cross-entropy of the student's logits against the teacher's confident hard labels.

    teacher_logits, student_logits: (B, C, H, W). Pixels whose teacher confidence is below
    ``threshold`` are ignored; the mean runs over the remaining pixels of the batch. When no pixel
    is confident the loss is a graph-connected zero (never NaN).
    """
    total, count = consistency_terms(teacher_logits, student_logits, threshold, ignore_index)
    return total / count if count else total


def consistency_terms(teacher_logits: Tensor, student_logits: Tensor, threshold: float,
                      ignore_index: int = 255) -> tuple[Tensor, int]:
    """``consistency_loss`` as (sum over the confident pixels, their number): the parts of a mean
    over several ranks' batches (``collectives.global_mean``). No confident pixel: (a
    graph-connected zero, 0)."""
    if teacher_logits.shape != student_logits.shape or teacher_logits.dim() != 4:
        raise ValueError(f"consistency_loss: teacher and student logits must both be (B, C, H, W), got "
                         f"{tuple(teacher_logits.shape)} and {tuple(student_logits.shape)}")
    targets = pseudo_labels(teacher_logits.detach(), threshold, ignore_index)  # (B, H, W)
    count = int((targets != ignore_index).sum())
    if not count:
        return student_logits.sum() * 0.0, 0
    return F.cross_entropy(student_logits.float(), targets, ignore_index=ignore_index, reduction="sum"), count


class Teacher:
    """The previous version of the network: a frozen copy that never receives gradients.

    mode "previous": ``snapshot(model)`` at the end of each epoch copies the student's weights.
    mode "ema": ``update(model)`` after each step moves the weights by ``ema_decay``.
    The teacher is kept in eval mode (BatchNorm uses running statistics) and is never DDP-wrapped.
    """

    def __init__(self, model: nn.Module, mode: str = "previous", ema_decay: float = 0.99):
        if mode not in ("previous", "ema"):
            raise ValueError(f"teacher mode {mode!r} is unknown; choose previous or ema")
        self.mode = mode
        self.ema_decay = ema_decay
        self.model = copy.deepcopy(_unwrap(model)).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def snapshot(self, model: nn.Module) -> None:
        """Copy the student's current weights (end of an epoch)."""
        self.model.load_state_dict(_unwrap(model).state_dict())

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """EMA step (mode "ema" only; a no-op for "previous")."""
        if self.mode != "ema":
            return
        student = _unwrap(model).state_dict()
        for name, t in self.model.state_dict().items():
            if t.dtype.is_floating_point:
                t.mul_(self.ema_decay).add_(student[name].detach(), alpha=1.0 - self.ema_decay)
            else:
                t.copy_(student[name])

    @torch.no_grad()
    def decode(self, feats: list[Tensor]) -> Tensor:
        """y = D_prev(h): the teacher's decoder on (detached) features, (B, C, H, W) logits."""
        return self.model.decode([f.detach() for f in feats])

    def state_dict(self) -> dict:
        return {"mode": self.mode, "ema_decay": self.ema_decay, "model": self.model.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.mode, self.ema_decay = state["mode"], state["ema_decay"]
        self.model.load_state_dict(state["model"])


def consistency_step(model: nn.Module, teacher: Teacher, x_u: Tensor, lambda_: float, *,
                     threshold: float, ignore_index: int = 255, mode: str = "bottleneck",
                     generator: torch.Generator | None = None, scale: str = "absolute",
                     collectives: Collectives | None = None) -> Tensor:
    """L_CR for a batch of unlabelled images x_u (B, C_in, H, W); with ``collectives``, x_u is this
    rank's share of the global batch and the mean runs over every rank's confident pixels."""
    net = _unwrap(model)
    feats = net.encode(x_u)  # h, fine to coarse
    y = teacher.decode(feats)  # (B, C, H, W), no gradient
    y_hat = net.decode(perturb(feats, lambda_, mode, generator, scale))
    return (collectives or Collectives()).global_mean(*consistency_terms(y, y_hat, threshold, ignore_index))


def _unwrap(model: nn.Module) -> nn.Module:
    """The plain module behind a DDP / compiled wrapper."""
    return getattr(model, "module", model)
