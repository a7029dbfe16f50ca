"""The baselines' unlabelled epoch: what a baseline cell does where a CSSL cell runs its L_tot epoch.

Every cell of one seed runs the same schedule (``cssl_ray.run.local``): the same stage A, the same
rounds, and in every round the same number of unlabelled-data steps, one pass over D_U in the
steps of ``plan.epoch_plan`` (``consistency.batch_size`` images each), followed by the same
supervised fine-tune epoch. A step of a baseline cell sees exactly what a CSSL step sees: the
step's D_U images and the same slice of D_L (``data.batches.labelled_slices``), whose ground truth CSSL
cuts into labelled patches and a baseline trains on with cross-entropy. One forward pass of the
concatenated batch [D_L slice; D_U images] (so BatchNorm normalises both, as SSL4MIS's scripts do),
then

    bn_mix        L = CE(D_L slice)                              a control: unlabelled images only
                                                                 in the BatchNorm batches
    pseudo_label  L = CE(D_L slice) + w_pl CE(D_U, pseudo-labels) (Lee 2013; the paper's softmax
                                                                 baseline) pseudo-labels of the
                                                                 round's model at pseudo.threshold,
                                                                 labelled once per round as CSSL's
    mean_teacher  L = CE(D_L slice) + w(t) MSE(softmax student(D_U), softmax teacher(D_U + noise))
                  (Tarvainen & Valpola 2017, as SSL4MIS's train_mean_teacher_2D.py); the teacher
                  is the EMA of the student, updated after every step; w(t) ramps up over
                  ``baselines.mt_rampup_rounds`` rounds (0: all of them, as SSL4MIS ramps over
                  its whole budget)
    cps           L = CE_A(D_L slice) + CE_B(D_L slice) + w (CE(A(D_U), argmax B) + CE(B(D_U), argmax A))
                  (Chen et al., CVPR 2021, Cross Pseudo Supervision): network A is the cell's own
                  model (the seed's stage A; its weights are tested), network B (the peer) the
                  stage-A model of seed + 1 (``peer_config``: another initialisation and batch
                  order on the same D_L, trained once and shared through the stage-A cache), each
                  trained on the other's hard pseudo-labels; B gets its own fine-tune epochs

Where the methods' own papers differ: they train one loop of mixed batches until an iteration
budget, not stage A + rounds of (unlabelled pass, fine-tune epoch); the platform fixes the budget
and the supervised batches of every cell, so a difference between cells is the unlabelled loss.
The steps use L_tot's optimiser (a fresh Adam at ``optim.cssl_lr`` from round 1, the same rate
and warm-up as CSSL's; ``schedule.RunState.begin_rounds``).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cssl_ray.baselines.cps import cps_loss
from cssl_ray.baselines.mean_teacher import consistency_weight, ema_update, mean_teacher_loss, noisy
from cssl_ray.baselines.pseudo_label import self_training_loss
from cssl_ray.config import Config
from cssl_ray.data.batches import labelled_slices
from cssl_ray.method.collectives import Collectives
from cssl_ray.method.supervised import supervised_loss
from cssl_ray.models.precision import Precision, backward_step

ROUND_METHODS = ("bn_mix", "pseudo_label", "mean_teacher", "cps")  # baselines with an unlabelled epoch per round
PEER_SEED_OFFSET = 1  # cps: network B is the stage-A model of train.seed + this


def peer_config(cfg: Config) -> Config:
    """CPS's network B: the supervised configuration of seed ``train.seed + PEER_SEED_OFFSET`` (its
    stage A is that seed's supervised cell's, so the stage-A cache shares it)."""
    t = dataclasses.replace(cfg.train, seed=cfg.train.seed + PEER_SEED_OFFSET, method="cssl", use_cl=False,
                            use_cr=False, use_hard_negatives=False)
    return dataclasses.replace(cfg, train=t)


@dataclass
class BaselineStep:
    """One step's inputs: ``unlabelled`` (b, C, H, W) D_U images, ``pseudo`` (b, H, W) their
    pseudo-labels (pseudo_label only, else None), ``labelled`` (l, C, H, W) and ``masks`` (l, H, W)
    the step's D_L slice."""

    unlabelled: Tensor
    pseudo: Tensor | None
    labelled: Tensor
    masks: Tensor


def baseline_steps(plan: list[Tensor], unlabelled: Tensor, pseudo: Tensor | None, labelled_images: Tensor,
                   labelled_masks: Tensor) -> Iterator[BaselineStep]:
    """The steps of ``plan`` (``plan.epoch_plan``) with the D_L slices CSSL's steps take (``labelled_slices``)."""
    for idx, l_idx in zip(plan, labelled_slices(labelled_images.shape[0], len(plan))):
        yield BaselineStep(unlabelled[idx], None if pseudo is None else pseudo[idx], labelled_images[l_idx],
                           labelled_masks[l_idx])


def baseline_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, steps: Iterator[BaselineStep], cfg: Config,
                   *, teacher: nn.Module | None = None, peer: nn.Module | None = None, step0: int = 0,
                   rampup_steps: int = 0,
                   generator: torch.Generator | None = None,
                   precision: Precision | None = None, scaler: torch.amp.GradScaler | None = None,
                   after_step: Callable[[], None] | None = None,
                   collectives: Collectives | None = None) -> dict[str, float]:
    """One unlabelled epoch of ``cfg.train.method`` (module docstring). ``teacher``: Mean Teacher's
    EMA model; ``peer``: CPS's network B (``optimizer`` steps both); ``step0``: unlabelled steps
    taken in earlier rounds (the EMA warm-up and the ramp's clock); ``rampup_steps``: the ramp's
    length in steps; ``generator``: the teacher's input noise. Returns the means of ``loss``,
    ``loss_sup_step`` (the D_L slice's CE) and ``loss_unsup`` (the unlabelled term, weighted), and
    ``steps``. ``collectives``: each rank passes its own steps (as many on every rank); every loss
    is a mean over all ranks' items (``global_mean_of``), the gradients of the model (and the peer)
    are averaged after each backward, and the returned means are over ranks."""
    col = collectives or Collectives()
    method, b = cfg.train.method, cfg.baselines
    if method not in ROUND_METHODS:
        raise ValueError(f"baseline_epoch: train.method {method!r} has no unlabelled epoch; allowed: "
                         f"{', '.join(ROUND_METHODS)}")
    if method == "mean_teacher" and teacher is None:
        raise ValueError("baseline_epoch: mean_teacher needs its EMA teacher")
    if method == "cps" and peer is None:
        raise ValueError("baseline_epoch: cps needs its peer network")
    ignore = cfg.pseudo.ignore_index
    device = next(model.parameters()).device
    prec = precision or Precision.from_config(cfg.train, device)
    model.train()
    if peer is not None:
        peer.train()
    sums = {"loss": 0.0, "loss_sup_step": 0.0, "loss_unsup": 0.0}
    average_gradients = gradient_sync(col, model, peer)
    done = 0
    for step in steps:
        x_l, y = prec.layout(step.labelled.to(device)), step.masks.to(device)
        x_u = prec.layout(step.unlabelled.to(device))
        n_l = x_l.shape[0]
        with prec.autocast():
            logits = forward_halves(model, x_l, x_u, b.bn_batch).float()  # (l + b, C, H, W)
        sup = (global_sup(logits[:n_l], y, ignore, col, cfg.train.sup_loss) if (n_l or col.world_size > 1)
               else logits.sum() * 0.0)
        unsup = logits.sum() * 0.0
        if method == "pseudo_label" and step.pseudo is not None:
            pseudo = step.pseudo.to(device)
            unsup = b.pseudo_weight * global_mean_of(self_training_loss(logits[n_l:], pseudo, ignore),
                                                     (pseudo != ignore).sum(), col)
        elif method == "cps":
            with prec.autocast():
                peer_logits = forward_halves(peer, x_l, x_u, b.bn_batch).float()  # (l + b, C, H, W)
            if n_l or col.world_size > 1:
                sup = sup + global_sup(peer_logits[:n_l], y, ignore, col, cfg.train.sup_loss)
            unsup = b.cps_weight * global_mean_of(cps_loss(logits[n_l:], peer_logits[n_l:]),
                                                  peer_logits[n_l:, 0].numel(), col)  # each term: all pixels
        elif method == "mean_teacher":
            with torch.no_grad(), prec.autocast():
                teacher.train()  # as SSL4MIS: the teacher's BatchNorm uses its batch's statistics
                t_logits = teacher(prec.layout(noisy(step.unlabelled, b.mt_noise_std, generator).to(device))).float()
            weight = consistency_weight(step0 + done, b.mt_weight, rampup_steps)
            unsup = weight * global_mean_of(mean_teacher_loss(logits[n_l:], t_logits), t_logits.numel(), col)
        loss = sup + unsup
        backward_step(loss, optimizer, scaler, after_backward=average_gradients)
        if teacher is not None:
            ema_update(teacher, model, b.mt_ema_decay, step0 + done)
        if after_step is not None:
            after_step()
        done += 1
        sums["loss"] += float(loss.detach())
        sums["loss_sup_step"] += float(sup.detach())
        sums["loss_unsup"] += float(unsup.detach())
    return {**col.mean_floats({k: v / max(done, 1) for k, v in sums.items()}), "steps": float(done)}


def gradient_sync(col: Collectives, *networks: nn.Module | None) -> Callable[[], None]:
    """``backward_step``'s after_backward for a step that trains ``networks`` (None entries skipped,
    e.g. CPS's network B when there is none): each one's gradients averaged over ranks."""
    trained = [n for n in networks if n is not None]

    def average() -> None:
        for net in trained:
            col.average_gradients(net)
    return average


def forward_halves(model: nn.Module, x_l: Tensor, x_u: Tensor, bn_batch: str) -> Tensor:
    """The student's logits (l + b, C, H, W) of a step's labelled then unlabelled images
    (``baselines.bn_batch``): "mixed" one forward, one BatchNorm batch (SSL4MIS); "separate" one forward
    per half, each normalised by its own batch statistics (an empty half is not forwarded)."""
    if bn_batch == "mixed" or not x_l.shape[0] or not x_u.shape[0]:
        return model(torch.cat([x_l, x_u]))
    return torch.cat([model(x_l), model(x_u)])


def global_mean_of(mean: Tensor, count: Tensor | int, col: Collectives) -> Tensor:
    """A loss that is a mean over this rank's ``count`` items, as its part of the mean over every rank's
    items (``Collectives.global_mean``: after the gradient average, the gradient of that mean; one
    process: ``mean`` itself, bit for bit)."""
    if col.world_size == 1:
        return mean
    return col.global_mean(mean * float(count), count)


def global_ce(logits: Tensor, target: Tensor, ignore: int, col: Collectives) -> Tensor:
    """Cross-entropy, the mean over the labelled pixels of every rank's batch (one process: F.cross_entropy)."""
    if col.world_size == 1:
        return F.cross_entropy(logits, target, ignore_index=ignore)
    return col.global_mean(F.cross_entropy(logits, target, ignore_index=ignore, reduction="sum"),
                           (target != ignore).sum())


def global_sup(logits: Tensor, target: Tensor, ignore: int, col: Collectives, kind: str) -> Tensor:
    """L_sup (``train.sup_loss`` ``kind``) over the labelled pixels of every rank's batch: ``global_ce``,
    plus SSL4MIS's Dice term for "ce_dice" (``cssl_ray.method.supervised``)."""
    return supervised_loss(global_ce(logits, target, ignore, col), logits, target, ignore, kind, col)
