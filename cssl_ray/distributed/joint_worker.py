"""``train.protocol: joint`` on Ray Train workers: one rank's share of ``cssl_ray.run.joint``'s loop.

    worker  (``train_worker`` sets up the rank: its shards, the state, a restored checkpoint)
            [simclr_pretrain: NT-Xent pretraining, the same on every rank, then rank 0's weights]
            per refresh r of train.total_steps / train.pseudo_refresh_steps:
              [cssl with L_CL or L_CR: each rank pseudo-labels its D_U shard with the network as it
               is (the paper's "previous version"); the statistics are of the whole D_U]
              -> ``joint.joint_steps`` on this rank's shards with the run's collectives (every
                 loss a global-batch mean, gradients averaged, CPS's network B too)
              -> BatchNorm statistics of rank 0 on every rank -> validation (counts summed)
              -> report on every rank (rank 0 attaches the checkpoint)

Every method runs here: the supervised references (cssl with L_CL and L_CR off), bn_mix,
mean_teacher, pseudo_label, cps, simclr_pretrain and the CSSL cells. Unlike the paper protocol's
Ray run there is no labeller pool and no weight store: a joint step needs its pseudo-labels from
the network of the refresh's start, labelled by each rank on its own shard (D_U is read once per
run, the rank's slice ``[rank::world]``), so nothing but gradients and counts crosses ranks.

SimCLR pretraining runs whole on every rank (``baseline_worker.pretrain_simclr``): not data parallel yet.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from cssl_ray.config import Config
from cssl_ray.data.bundle import DataBundle
from cssl_ray.distributed.baseline_worker import pretrain_simclr
from cssl_ray.method.collectives import Collectives
from cssl_ray.run.joint import joint_steps, uses_unlabelled
from cssl_ray.run.labelling import label_round
from cssl_ray.run.schedule import RunState


def joint_rounds(state: RunState, cfg: Config, shard: Any, col: Collectives,
                 validate: Callable[[dict[str, Any]], dict[str, float]],
                 report: Callable[[dict[str, Any]], None]) -> None:
    """The joint loop of one rank (module docstring) from ``state.round`` on. ``shard``: the rank's
    ``train_worker._RankShard``; ``validate`` validates and records (the worker's), ``report``
    reports a record and checkpoints the state on every rank."""
    t = cfg.train
    names = shard.source.class_names
    if t.method == "simclr_pretrain" and state.round == 0 and not state.history:
        state.history.append({"stage": "pretrain", "round": 0, **pretrain_simclr(state, cfg, shard, col)})
    unlabelled, hidden = shard.unlabelled() if uses_unlabelled(cfg) else (shard.labelled_images[:0], None)
    bundle = _rank_bundle(shard, unlabelled, names)
    cssl_labels = t.method == "cssl" and (t.use_cl or t.use_cr) and shard.source.count("unlabelled") > 0
    while state.round < t.last_round():
        state.round += 1
        first = (state.round - 1) * t.pseudo_refresh_steps
        n_steps = min(t.pseudo_refresh_steps, t.total_steps - first)
        record: dict[str, Any] = {"stage": "round", "round": state.round, "joint_step": first + n_steps}
        pseudo = None
        if cssl_labels:
            if col.rank == 0:  # Fig. 2: the first images of the whole D_U, labelled by rank 0
                state.take_snapshot(cfg, shard.snapshot_images())
            pseudo, stats = label_round(state.model, cfg, unlabelled, hidden_masks=hidden, class_names=names,
                                        labelled_images=shard.labelled_images, collectives=col)
            record.update(stats)
            state.check_coverage(stats, names)
            if state.teacher is not None and (cfg.consistency.teacher == "previous" or state.round == 1):
                state.teacher.snapshot(state.model)  # the previous network (ema: the average's start)
        record.update(joint_steps(state, cfg, bundle, first, n_steps, pseudo, col))
        for net in _networks(state):  # BatchNorm statistics moved on each rank's own batches
            col.broadcast_buffers(net)
        state.track_best(validate(record))
        report(record)


def _networks(state: RunState) -> list[torch.nn.Module]:
    """Every network whose buffers the joint steps move: the student, Mean Teacher's EMA, CPS's B."""
    nets = [state.model]
    if state.ema is not None:
        nets.append(state.ema)
    if state.peer is not None:
        nets.append(state.peer.model)
    return nets


def broadcast_networks(state: RunState, col: Collectives) -> None:
    """Rank 0's parameters and buffers of every network of a joint state on every rank (the student
    is broadcast by the worker, as in the paper's protocol)."""
    for net in _networks(state)[1:]:
        col.broadcast_state(net)


def _rank_bundle(shard: Any, unlabelled: torch.Tensor, names: list[str]) -> DataBundle:
    """The arrays ``joint_steps`` reads: this rank's D_L and D_U shards (val stays with ``validate``,
    test with the driver)."""
    empty = shard.labelled_images[:0]
    no_masks = shard.labelled_masks[:0]
    return DataBundle(shard.labelled_images, shard.labelled_masks, unlabelled, None, empty, no_masks, empty, no_masks,
                      list(names), shard.source.split)
