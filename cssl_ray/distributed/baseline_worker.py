"""The baseline cells under the paper's protocol on Ray Train workers: what a rank does where
``cssl_ray.run.local`` runs a baseline's pieces in one process.

    simclr_pretrain  before stage A: NT-Xent pretraining, run whole on every rank (the same images,
                     seed and steps give the same weights; rank 0's are broadcast against
                     non-deterministic kernels): not data parallel
    cps              after stage A: network B's own stage A (seed + 1, ``peer_config``) on the
                     rank's D_L shard, data parallel; every round B's own fine-tune epoch
    bn_mix, mean_teacher, pseudo_label, cps
                     every round: the unlabelled epoch of ``baseline_rounds.baseline_epoch`` on the
                     rank's D_U shard, in the steps ``plan.epoch_plan`` deals the ranks (as CSSL's
                     L_tot epoch), every loss a global-batch mean, gradients (B's too) averaged;
                     pseudo_label first labels the shard with the round's model (statistics summed
                     over ranks)

No labeller actors: a baseline's pseudo-labels (pseudo_label's) come from the rank's own model.
Unlike ``--local``, a Ray run does not share stage A through the stage-A cache: CPS trains B's.
"""
from __future__ import annotations

from typing import Any

import torch

from cssl_ray.baselines.simclr import simclr_pretrain
from cssl_ray.config import Config
from cssl_ray.method.collectives import Collectives, rank_share
from cssl_ray.method.streams import stream_seed
from cssl_ray.run.baseline_rounds import baseline_steps
from cssl_ray.run.labelling import label_round
from cssl_ray.run.loop import evaluate, supervised_epoch
from cssl_ray.run.plan import epoch_plan
from cssl_ray.run.schedule import RunState
from cssl_ray.run.supervised_epochs import stage_a_plan, sup_steps


def pretrain_simclr(state: RunState, cfg: Config, shard: Any, col: Collectives) -> dict[str, float]:
    """SimCLR pretraining of the student on all of D_L and D_U (D_L alone for simclr_dl), the same on every
    rank (module docstring)."""
    source = shard.source
    generator = torch.Generator().manual_seed(stream_seed(cfg.train.seed, "simclr"))
    pretrained = simclr_pretrain(state.model, source.take("labelled")[0], source.take("unlabelled")[0], cfg, generator)
    col.broadcast_state(state.model)
    return pretrained


def baseline_round(state: RunState, cfg: Config, shard: Any, col: Collectives) -> dict[str, Any]:
    """A baseline cell's unlabelled epoch of this round on this rank (module docstring)."""
    unlabelled, hidden = shard.unlabelled()
    names = shard.source.class_names
    record: dict[str, Any] = {}
    pseudo = None
    if cfg.train.method == "pseudo_label":
        if col.rank == 0:  # Fig. 2: the first images of the whole D_U
            state.take_snapshot(cfg, shard.snapshot_images())
        pseudo, record = label_round(state.model, cfg, unlabelled, hidden_masks=hidden, class_names=names,
                                     labelled_images=shard.labelled_images, collectives=col)
        state.check_coverage(record, names)
    plan = epoch_plan(shard.n_unlabelled, cfg, state.streams, col)
    steps = baseline_steps(plan, unlabelled, pseudo, shard.labelled_images, shard.labelled_masks)
    return {**record, **state.baseline_epoch(cfg, steps, len(plan), col)}


def _peer_epoch(peer: RunState, shard: Any, col: Collectives, steps: int) -> dict[str, float]:
    """One supervised epoch of network B on this rank's D_L shard (``steps``: its length)."""
    t = peer.cfg.train
    stats = supervised_epoch(peer.model, peer.optimizer, shard.labelled_images, shard.labelled_masks,
                             batch_size=rank_share(t.batch_size, col.rank, col.world_size), steps=steps,
                             augment=t.augment, ignore_index=peer.cfg.pseudo.ignore_index,
                             generator=peer.streams.sup, collectives=col, precision=peer.precision,
                             scaler=peer.scaler, sup_loss=t.sup_loss)
    col.broadcast_buffers(peer.model)
    return stats


def trained_peer(state: RunState, shard: Any, col: Collectives) -> RunState:
    """CPS's network B after its own stage A (seed + 1), data parallel, leaving this rank's global
    random state as it was (``local._trained_peer``, on the rank's shards)."""
    device = next(state.model.parameters()).device
    source = shard.source
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        peer = state.make_peer()
        col.broadcast_state(peer.model)
        plan = stage_a_plan(peer.cfg.train, source.count("labelled"))
        for epoch, n_steps in enumerate(plan):
            stats = _peer_epoch(peer, shard, col, n_steps)
            val = evaluate(peer.model, shard.val_images, shard.val_masks, num_classes=peer.cfg.data.num_classes,
                           class_names=source.class_names, ignore_index=peer.cfg.pseudo.ignore_index,
                           batch_size=peer.cfg.consistency.batch_size, collectives=col, precision=peer.precision)
            peer.history.append({"stage": "supervised", "round": 0, "epoch": epoch, **stats,
                                 **{f"val_{k}": v for k, v in val.items()}})
            if peer.after_stage_a_epoch(epoch, val, stats["loss_sup"]):
                break
        peer.finish_stage_a()
    return peer


def peer_fine_tune(state: RunState, shard: Any, col: Collectives) -> float:
    """Network B's fine-tune epoch of this round (its own batches); its mean loss."""
    peer = state.peer
    peer.start_round()
    return _peer_epoch(peer, shard, col, sup_steps(peer.cfg.train, shard.source.count("labelled")))["loss_sup"]
