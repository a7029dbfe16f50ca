"""Mean Teacher (Tarvainen & Valpola, NeurIPS 2017), as in SSL4MIS's ``train_mean_teacher_2D.py``.

A student is trained on labelled images plus a consistency term that pulls its softmax towards the
softmax of a teacher, the exponential moving average (EMA) of the student's weights, on the same
unlabelled images with Gaussian input noise. The teacher never receives gradients.

Legend (SSL4MIS defaults):

    alpha   EMA weight of the teacher, min(1 - 1/(step+1), decay): the true average of the
            student's weights for the first steps, then a fixed decay; decay in [0, 1), 0.99
    w(t)    consistency weight, weight * exp(-5 (1 - t)^2) with t = step / rampup_steps clipped
            to [0, 1] (the sigmoid ramp-up of Laine & Aila 2017); SSL4MIS: weight 0.1, 200
    std     input noise of the teacher, N(0, std^2) clamped to [-2 std, 2 std]; 0.1 (clamp 0.2)

    L = L_sup(student) + w(t) * mean((softmax(student) - softmax(teacher))^2)
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, decay: float, step: int) -> None:
    """theta_teacher <- alpha * theta_teacher + (1 - alpha) * theta_student, in place.

    ``alpha = min(1 - 1/(step+1), decay)``, so step 0 copies the student (alpha 0). ``step`` is the
    number of optimiser steps taken before this update (SSL4MIS's ``iter_num``), >= 0.

    Buffers (BatchNorm running statistics, ``num_batches_tracked``) are copied from the student.
    SSL4MIS averages only the parameters and leaves its teacher in train mode, so there the
    teacher's BatchNorm statistics follow its own forward passes on noisy unlabelled images;
    copying them keeps the teacher usable in eval mode and independent of how often it is run.
    """
    if not 0.0 <= decay < 1.0:  # also rejects NaN
        raise ValueError(f"decay must be in [0, 1), got {decay!r}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step!r}")
    alpha = min(1.0 - 1.0 / (step + 1), decay)
    for kind, t_items, s_items in (("parameter", teacher.named_parameters(), student.named_parameters()),
                                   ("buffer", teacher.named_buffers(), student.named_buffers())):
        t_items, s_items = list(t_items), list(s_items)
        if len(t_items) != len(s_items):
            raise ValueError(f"ema_update: teacher has {len(t_items)} {kind}s, student {len(s_items)}")
        for (name, t), (_, s) in zip(t_items, s_items):
            if t.shape != s.shape:
                raise ValueError(f"ema_update: {kind} {name} is {tuple(t.shape)} in the teacher, "
                                 f"{tuple(s.shape)} in the student")
            if kind == "parameter":
                t.mul_(alpha).add_(s.detach(), alpha=1.0 - alpha)
            else:
                t.copy_(s)


def sigmoid_rampup(current: float, length: float) -> float:
    """exp(-5 (1 - t)^2), t = current / length clipped to [0, 1]; 1.0 when ``length`` is 0.

    Rises from exp(-5) ~ 0.0067 at 0 to 1 at ``length`` and stays there (Laine & Aila 2017).
    """
    if length < 0 or math.isnan(length):
        raise ValueError(f"length must be >= 0, got {length!r}")
    if length == 0:
        return 1.0
    t = min(max(current / length, 0.0), 1.0)
    return math.exp(-5.0 * (1.0 - t) ** 2)


def consistency_weight(step: float, weight: float, rampup_steps: float) -> float:
    """w(t) = weight * sigmoid_rampup(step, rampup_steps); ``weight`` >= 0 is the final value."""
    if weight < 0 or math.isnan(weight):
        raise ValueError(f"weight must be >= 0, got {weight!r}")
    return weight * sigmoid_rampup(step, rampup_steps)


def mean_teacher_loss(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """mean((softmax(student) - softmax(teacher))^2) over every element, a scalar.

    student_logits, teacher_logits: (B, C, H, W) (or any equal shapes with classes on dim 1). The
    teacher side is detached: its gradient is never computed. Softmax is taken in float32. B = 0
    gives NaN, like ``torch.mean`` of an empty tensor; callers skip empty unlabelled batches.
    """
    if student_logits.shape != teacher_logits.shape or student_logits.dim() < 2:
        raise ValueError(f"mean_teacher_loss: student and teacher logits must have equal (B, C, ...) shapes, got "
                         f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}")
    p_s = torch.softmax(student_logits.float(), dim=1)  # (B, C, H, W)
    p_t = torch.softmax(teacher_logits.detach().float(), dim=1)  # (B, C, H, W), no gradient
    return ((p_s - p_t) ** 2).mean()


def noisy(x: Tensor, std: float = 0.1, generator: torch.Generator | None = None) -> Tensor:
    """x + clamp(N(0, std^2), -2 std, 2 std): SSL4MIS's noise on the teacher's input.

    x: any shape, float. The noise is drawn on the generator's device (CPU keeps runs reproducible
    across devices) and moved to x's. ``std`` 0 returns an equal copy of x.
    """
    if not std >= 0:  # also rejects NaN
        raise ValueError(f"std must be >= 0, got {std!r}")
    gen_device = generator.device if generator is not None else x.device
    noise = torch.randn(x.shape, generator=generator, device=gen_device, dtype=x.dtype).to(x.device)
    return x + (noise * std).clamp(-2.0 * std, 2.0 * std)
