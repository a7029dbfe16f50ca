"""``train.protocol: joint``: the fixed-budget protocol of the semi-supervised segmentation literature.

SSL4MIS (Luo et al.), Cross Pseudo Supervision (Chen et al., CVPR 2021) and UniMatch (Yang et al.,
CVPR 2023) train one loop from the initial weights: ``train.total_steps`` optimiser steps, each on a
labelled batch (``train.batch_size`` of D_L, augmented) and an unlabelled batch
(``consistency.batch_size`` of D_U, augmented alike), with

    L = L_sup + w(t) L_unsup,   w(t) = sigmoid ramp over train.rampup_steps (0: the whole budget)

and the rate decayed from ``optim.lr`` to 0 by ``optim.joint_schedule`` (poly (1 - t/T)^0.9, as
SSL4MIS and CPS; or cosine); no early stopping. Every ``train.pseudo_refresh_steps`` steps is a
"round": validation, the best weights kept by ``train.select_metric``, a checkpoint (resume goes on
from the last one) and, for CSSL, new pseudo-labels. The test runs once, on the best-validation
weights, with the last round's weights tested beside them. L_unsup per ``train.method``:

    cssl          w_cl L_CL + w_cr L_CR (the paper's losses; L_sup is the labelled batch's CE). At
                  each round's start D_U is pseudo-labelled by the network as it is then (the paper's
                  "previous version"), and each step's contrastive batch is drawn from the class-wise
                  windows of its unlabelled batch (those pseudo-labels) and of its labelled batch
                  (ground truth). L_CR's teacher is that previous network (consistency.teacher:
                  previous) or an EMA of the student; lambda_ follows omega as in the paper's rounds.
                  use_cl = use_cr = false: the supervised reference (no unlabelled batch at all)
    bn_mix        0: D_U only shares the labelled images' BatchNorm batch (the control)
    mean_teacher  baselines.mt_weight x MSE(softmax student(u), softmax teacher(u + noise)); the
                  teacher is the EMA of the student (baselines.mt_ema_decay), from the initial
                  weights, updated after every step (Tarvainen & Valpola 2017; SSL4MIS
                  train_mean_teacher_2D.py)
    pseudo_label  baselines.pseudo_weight x CE(u, the network's own confident argmax, no gradient
                  through it) at pseudo.threshold (Lee 2013, with the same rule as CSSL's labels)
    cps           baselines.cps_weight x (CE(A(u), argmax B(u)) + CE(B(u), argmax A(u))); network
                  B is initialised independently (another seed's initial weights) and trained by
                  the same optimiser on the same batches, L_sup on both; A is tested (Chen et al.)
    simclr_pretrain  NT-Xent pretraining on D_L + D_U first, then the supervised budget

Every cell of a seed draws the same labelled batches and augmentation (``streams.sup``), so a
difference between cells is what the unlabelled batch adds. ``train.ltot_bn``, ``max_rounds``,
``stage_a_steps`` and the rounds' rates (``optim.cssl_lr``...) belong to the paper's protocol and
are not read here.

Data parallel (``cssl_ray.distributed.joint_worker`` runs these steps on Ray Train workers): with
``collectives`` each rank passes its shard of D_L and D_U and takes its ``rank_share`` of every
global batch (``train.batch_size``, ``consistency.batch_size``, ``patches.batch_size``); every loss
is a mean over the global batch (``global_mean``: pixels, covered pixels, elements), the gradients
of every trained network (CPS's B too) are averaged after each backward, and the EMA teacher moves
alike on every rank. One step on N ranks is then one process's step on the same global batch
(tests/test_joint_world_size.py), BatchNorm's per-rank statistics and the ranks' own draws (which
images form a batch, the teacher's noise) aside, as for the paper's protocol.
"""
from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from cssl_ray.baselines.cps import cps_loss
from cssl_ray.baselines.mean_teacher import ema_update, mean_teacher_loss, noisy, sigmoid_rampup
from cssl_ray.baselines.pseudo_label import self_training_loss
from cssl_ray.baselines.simclr import simclr_pretrain
from cssl_ray.config import Config, validate
from cssl_ray.data.augment import flip_rotate
from cssl_ray.data.batches import index_batches
from cssl_ray.data.bundle import DataBundle
from cssl_ray.method.collectives import Collectives, rank_share
from cssl_ray.method.consistency import noise_variance
from cssl_ray.method.objective import StepInputs, Terms, cssl_objective
from cssl_ray.method.patches import class_balanced_batches
from cssl_ray.method.streams import stream_seed
from cssl_ray.models.precision import backward_step
from cssl_ray.run import checkpoint as ckpt
from cssl_ray.run.baseline_rounds import forward_halves, global_mean_of, global_sup, gradient_sync
from cssl_ray.run.labelling import label_round
from cssl_ray.run.loop import patch_omega
from cssl_ray.run.plan import image_patches
from cssl_ray.run.records import evaluate_best, open_run, progress_bar, save_round, validate_record
from cssl_ray.run.schedule import RunState

UNLABELLED_METHODS = ("bn_mix", "mean_teacher", "pseudo_label", "cps")  # + cssl with use_cl or use_cr


def joint_lr(cfg: Config, step: int) -> float:
    """The rate at step ``step`` (0-based) of ``train.total_steps``: ``optim.lr`` decayed by
    ``optim.joint_schedule`` (poly: (1 - t/T)^0.9; cosine: (1 + cos(pi t/T)) / 2)."""
    frac = min(step / cfg.train.total_steps, 1.0)
    if cfg.optim.joint_schedule == "cosine":
        return cfg.optim.lr * 0.5 * (1.0 + math.cos(math.pi * frac))
    return cfg.optim.lr * (1.0 - frac) ** 0.9


def unsup_weight(cfg: Config, step: int) -> float:
    """w(t) at step ``step``: the sigmoid ramp exp(-5 (1 - t/L)^2) over ``train.rampup_steps``
    (0: the whole budget), 1 after it."""
    t = cfg.train
    return sigmoid_rampup(step, t.rampup_steps or t.total_steps)


def uses_unlabelled(cfg: Config) -> bool:
    """Whether the cell's steps take an unlabelled batch."""
    t = cfg.train
    return t.method in UNLABELLED_METHODS or (t.method == "cssl" and (t.use_cl or t.use_cr))


def run_joint(cfg: Config, *, resume: bool = False,
              log: Callable[[dict[str, Any]], None] | None = None) -> Any:
    """Train one run under ``train.protocol: joint`` in this process (module docstring); returns
    ``records.RunResult`` (test metrics on the best-validation weights, the last round's beside them)."""

    validate(cfg)
    start = time.perf_counter()
    t = cfg.train
    device, bundle, out_dir = open_run(cfg)
    state = joint_state(cfg, device)
    if resume and (last := ckpt.latest_checkpoint(out_dir)) is not None:
        state.load_state_dict(ckpt.load(last, map_location="cpu"))
    emit = log or (lambda record: None)
    rounds = t.last_round()
    bar = progress_bar(rounds, t.progress)
    bar.update(state.round)
    if t.method == "simclr_pretrain" and state.round == 0:  # before the first step (a resume has it)
        pretrained = simclr_pretrain(state.model, bundle.labelled_images, bundle.unlabelled_images, cfg,
                                     torch.Generator().manual_seed(stream_seed(t.seed, "simclr")))
        state.history.append({"stage": "pretrain", "round": 0, **pretrained})
    while state.round < rounds:
        state.round += 1
        first = (state.round - 1) * t.pseudo_refresh_steps
        n_steps = min(t.pseudo_refresh_steps, t.total_steps - first)
        record: dict[str, Any] = {"stage": "round", "round": state.round, "joint_step": first + n_steps}
        pseudo = None
        if t.method == "cssl" and (t.use_cl or t.use_cr) and bundle.unlabelled_images.shape[0]:
            state.take_snapshot(cfg, bundle.unlabelled_images)
            pseudo, stats = label_round(state.model, cfg, bundle.unlabelled_images,
                                        hidden_masks=bundle.unlabelled_masks_hidden, class_names=bundle.class_names,
                                        labelled_images=bundle.labelled_images)
            record.update(stats)
            if state.teacher is not None and (cfg.consistency.teacher == "previous" or state.round == 1):
                state.teacher.snapshot(state.model)  # the previous network (ema: the average's start)
        record.update(joint_steps(state, cfg, bundle, first, n_steps, pseudo))
        val = validate_record(state, cfg, bundle, record)
        emit(record)
        bar.set_postfix(step=first + n_steps, dice=f"{val['dice_mean']:.3f}")
        bar.update(1)
        state.track_best(val)
        save_round(state, cfg, out_dir)
    bar.close()
    return evaluate_best(state, cfg, bundle, out_dir, start)


def joint_state(cfg: Config, device: torch.device, rank: int = 0) -> RunState:
    """A ``RunState`` for the joint loop: its model (the seed's initial weights), Mean Teacher's EMA
    copy of them, CPS's network B (another seed's initial weights: ``RunState.make_peer``) and one
    Adam over every trained network, kept as ``cssl_optimizer`` so a checkpoint restores it whole.
    ``rank``: a data-parallel rank's own random streams (the same weights on every rank)."""
    state = RunState(cfg, device, rank=rank)
    if cfg.train.method == "cps":
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            state.peer = state.make_peer()
    if cfg.train.method == "mean_teacher":
        state.ema = state._frozen_copy()
    state.cssl_optimizer = state._adam(cfg.optim.lr, with_peer=True)
    return state


def _batches(n: int, batch_size: int, steps: int, generator: torch.Generator) -> Iterator[Tensor]:
    """``steps`` shuffled index batches of ``n`` items (reshuffled after each pass), or empty ones."""
    if n == 0:
        return iter([torch.zeros(0, dtype=torch.int64)] * steps)
    return index_batches(n, batch_size, steps, generator)


def joint_steps(state: RunState, cfg: Config, bundle: DataBundle, first: int, n_steps: int,
                pseudo: Tensor | None = None, collectives: Collectives | None = None) -> dict[str, float]:
    """Steps ``first`` .. ``first + n_steps - 1`` of the budget (module docstring); ``pseudo`` (U, H, W):
    CSSL's pseudo-labels of D_U for these steps. Returns the means of ``loss``, ``loss_sup``,
    ``loss_unsup`` (weighted), and of CSSL's ``loss_cl`` / ``loss_cr`` / ``omega`` / ``patches_per_step``,
    plus ``unsup_weight`` at the last step (the rate is the record's ``lr``). ``collectives``: this
    rank's shards in ``bundle`` (module docstring); the returned means are over ranks."""
    col = collectives or Collectives()
    t, b, streams = cfg.train, cfg.baselines, state.streams
    model, optimizer, prec = state.model, state.cssl_optimizer, state.precision
    device = next(model.parameters()).device
    ignore = cfg.pseudo.ignore_index
    labelled, masks, unlabelled = bundle.labelled_images, bundle.labelled_masks, bundle.unlabelled_images
    with_u = uses_unlabelled(cfg) and unlabelled.shape[0] > 0
    lab = _batches(labelled.shape[0], rank_share(t.batch_size, col.rank, col.world_size), n_steps, streams.sup)
    unl = _batches(unlabelled.shape[0] if with_u else 0, rank_share(cfg.consistency.batch_size, col.rank, col.world_size),
                   n_steps, streams.cr)
    average_gradients = gradient_sync(col, model, state.peer.model if state.peer is not None else None)

    cssl = t.method == "cssl" and (t.use_cl or t.use_cr)
    lambda_ = noise_variance(0.0 if state.omega is None else state.omega, cfg.consistency.eps)
    sums: dict[str, float] = {"loss": 0.0, "loss_sup": 0.0, "loss_unsup": 0.0}
    omegas: list[float] = []
    realised = 0
    model.train()
    if state.peer is not None:
        state.peer.model.train()
    w = 0.0
    for k, (l_idx, u_idx) in enumerate(zip(lab, unl)):
        step = first + k
        for group in (*optimizer.param_groups, *state.optimizer.param_groups):  # the latter: the record's "lr"
            group["lr"] = joint_lr(cfg, step)
        w = unsup_weight(cfg, step)
        x_l, y_l = labelled[l_idx], masks[l_idx]
        if t.augment and x_l.shape[0]:
            x_l, y_l = flip_rotate(x_l, y_l, streams.sup)
        x_u = unlabelled[u_idx] if with_u else unlabelled[:0]
        p_u = pseudo[u_idx] if (pseudo is not None and with_u) else torch.zeros(x_u.shape[:1] + x_u.shape[2:],
                                                                                 dtype=torch.int64)
        if t.augment and x_u.shape[0]:
            x_u, p_u = flip_rotate(x_u, p_u, streams.cr)  # the pseudo-labels follow their images
        x_l, y_l, x_u = prec.layout(x_l.to(device)), y_l.to(device), prec.layout(x_u.to(device))
        n_l = x_l.shape[0]
        stats: dict[str, Tensor] = {}
        if cssl:
            out = _cssl_step(state, cfg, x_l, y_l, l_idx, x_u, p_u, u_idx, lambda_, w, col)
            sup, unsup = out["loss_sup_ltot"], out["loss"] - out["loss_sup_ltot"]
            stats = {"loss_cl": out["loss_cl"], "loss_cr": out["loss_cr"]}
            if out.get("z") is not None:
                omegas.append(patch_omega(model, out["patches"], out["classes"], cfg, state.aux, streams, col, out=out))
                realised += int(out["z"].shape[0])  # gathered: every rank's share
        else:
            with prec.autocast():
                logits = forward_halves(model, x_l, x_u, b.bn_batch).float()  # (l [+ b], C, H, W)
            sup = global_sup(logits[:n_l], y_l, ignore, col, t.sup_loss)
            unsup = logits.sum() * 0.0
            if t.method == "mean_teacher" and x_u.shape[0]:
                with torch.no_grad(), prec.autocast():
                    state.ema.train()  # as SSL4MIS: the teacher's BatchNorm normalises by its batch
                    t_logits = state.ema(prec.layout(noisy(x_u, b.mt_noise_std, streams.noise))).float()
                unsup = w * b.mt_weight * global_mean_of(mean_teacher_loss(logits[n_l:], t_logits), t_logits.numel(), col)
            elif t.method == "pseudo_label" and x_u.shape[0]:
                with torch.no_grad():
                    conf, hard = logits[n_l:].detach().softmax(1).max(1)
                    hard[conf < cfg.pseudo.threshold] = ignore
                unsup = w * b.pseudo_weight * global_mean_of(self_training_loss(logits[n_l:], hard, ignore),
                                                      (hard != ignore).sum(), col)
            elif t.method == "cps" and x_u.shape[0]:
                with prec.autocast():
                    peer_logits = forward_halves(state.peer.model, x_l, x_u, b.bn_batch).float()
                sup = sup + global_sup(peer_logits[:n_l], y_l, ignore, col, t.sup_loss)
                unsup = w * b.cps_weight * global_mean_of(cps_loss(logits[n_l:], peer_logits[n_l:]),
                                                   peer_logits[n_l:, 0].numel(), col)  # each term: all pixels
        loss = sup + unsup
        backward_step(loss, optimizer, state.cssl_scaler, after_backward=average_gradients)
        if state.ema is not None:
            ema_update(state.ema, model, b.mt_ema_decay, step)
        if cssl and state.teacher is not None:
            state.teacher.update(model)
        sums["loss"] += float(loss.detach())
        sums["loss_sup"] += float(sup.detach())
        sums["loss_unsup"] += float(unsup.detach())
        for key, value in stats.items():
            sums[key] = sums.get(key, 0.0) + float(value.detach())
    done = max(n_steps, 1)
    result = col.mean_floats({k: v / done for k, v in sums.items()})
    result.update({"steps": float(n_steps), "unsup_weight": w})
    if cssl:
        result["lambda"] = lambda_
        if omegas:  # the same on every rank (patch_omega broadcasts rank 0's)
            state.omega = sum(omegas) / len(omegas)
            result["omega"] = state.omega
        if t.use_cl:
            result["patches_per_step"] = realised / done
    return result


def _cssl_step(state: RunState, cfg: Config, x_l: Tensor, y_l: Tensor, l_idx: Tensor, x_u: Tensor, p_u: Tensor,
               u_idx: Tensor, lambda_: float, w: float, col: Collectives) -> dict[str, Any]:
    """One joint CSSL step: L_sup on the labelled batch + w (w_cl L_CL + w_cr L_CR); L_CL's batch is
    class-balanced from the windows of the labelled batch (ground truth) and of the unlabelled one
    (its pseudo-labels), this rank's share of ``patches.batch_size`` patches; a step uses L_CL only
    when every rank has a window (L_CL's all-gather needs every rank)."""
    t, streams, prec = cfg.train, state.streams, state.precision
    device = x_l.device
    patches = classes = None
    if t.use_cl:
        l_p, l_c = image_patches(cfg, x_l.cpu(), y_l.cpu(), l_idx, state.round, labelled=True)
        u_p, u_c = image_patches(cfg, x_u.cpu(), p_u, u_idx, state.round, labelled=False)
        pool, pool_c = torch.cat([l_p, u_p]), torch.cat([l_c, u_c])
        if col.agree_steps(int(pool.shape[0] > 0)):
            share = rank_share(cfg.patches.batch_size, col.rank, col.world_size)
            idx = class_balanced_batches(pool_c, share, num_batches=1, generator=streams.patches)[0]
            patches, classes = prec.layout(pool[idx].to(device)), pool_c[idx].to(device)
    inputs = StepInputs(patches, classes, x_u if (t.use_cr and x_u.shape[0]) else None, labelled=x_l,
                        labelled_masks=y_l)
    terms = Terms.of(cfg)
    if t.use_cl and patches is None:  # no window anywhere in the step: L_sup (+ L_CR) alone
        terms = dataclasses.replace(terms, use_cl=False)
    with prec.autocast():
        out = cssl_objective(state.model, state.teacher if t.use_cr else None, inputs, terms, lambda_=lambda_,
                             aux=state.aux, streams=streams, unsup_weight=w, collectives=col)
    out["patches"] = patches
    return out

