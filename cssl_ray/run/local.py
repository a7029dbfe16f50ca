"""The whole CSSL schedule in one process (no Ray): stage A, then rounds, then test.

The rules (stage A's early stop, the rounds' rate, the stop rule, the best weights) live in
``cssl_ray.run.schedule.RunState``; this module drives them in one process. With use_cl = use_cr = False
the rounds hold only the fine-tune epoch: the fully supervised baseline, with bit-identical
supervised batches to the CSSL cells of the same seed (``cssl_ray.method.streams``).
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from cssl_ray.baselines.simclr import simclr_pretrain
from cssl_ray.config import Config, to_dict, validate
from cssl_ray.data.bundle import DataBundle
from cssl_ray.method.streams import stream_seed
from cssl_ray.run import checkpoint as ckpt
from cssl_ray.run.baseline_rounds import ROUND_METHODS, baseline_steps
from cssl_ray.run.labelling import label_round
from cssl_ray.run.loop import supervised_epoch
from cssl_ray.run.plan import epoch_plan, local_steps
from cssl_ray.run.records import RunResult, evaluate_best, open_run, progress_bar, save_round, validate_record
from cssl_ray.run.schedule import RunState
from cssl_ray.run.supervised_epochs import stage_a_plan


def run_local(cfg: Config, *, resume: bool = False, log: Callable[[dict[str, Any]], None] | None = None,
              stage_a_cache: str | Path | None = None) -> RunResult:
    """Train one CSSL run in this process; returns test metrics on the best-validation weights.
    ``train.protocol: joint`` runs ``cssl_ray.run.joint.run_joint`` instead (no stage A, no cache).

    ``stage_a_cache``: a folder shared by runs (an ablation's cells, a search's trials) where the
    state at the end of stage A is kept under ``stage_a_key(cfg)``: runs whose stage A would be
    identical (same data, model, optimiser, seed and supervised schedule; the CSSL switches and
    hyperparameters do not enter stage A) load it instead of training it again. A run that loads it
    ends bit-identical to one that trained stage A itself (tests/test_stage_a_cache.py).
    """
    validate(cfg)
    if cfg.train.protocol == "joint":  # one loop from the initial weights: no stage A to share
        from cssl_ray.run.joint import run_joint
        return run_joint(cfg, resume=resume, log=log)
    start = time.perf_counter()
    t = cfg.train
    device, bundle, out_dir = open_run(cfg)
    state = RunState(cfg, device)
    if resume and (last := ckpt.latest_checkpoint(out_dir)) is not None:
        # CPU: torch.set_rng_state needs a CPU tensor; load_state_dict moves the rest to the device
        state.load_state_dict(ckpt.load(last, map_location="cpu"))
    emit = log or (lambda record: None)
    stage_a_epochs = len(stage_a_plan(t, bundle.labelled_images.shape[0]))
    bar = progress_bar(stage_a_epochs + t.max_rounds, t.progress)
    bar.update((stage_a_epochs if state.stage_a_done else len(state.history)) + state.round)  # resumed work

    def validate_and_record(record: dict[str, Any]) -> dict[str, float]:
        val = validate_record(state, cfg, bundle, record)
        emit(record)
        bar.set_postfix(stage=record["stage"], dice=f"{val['dice_mean']:.3f}")
        bar.update(1)
        return val

    sup = _sup_args(state, cfg)
    if not state.stage_a_done:  # stage A (skipped when resuming past it)
        _stage_a(state, cfg, bundle, stage_a_cache, validate_and_record, emit)
        bar.n = stage_a_epochs  # early stopping skips the rest of the budget
        bar.refresh()
        save_round(state, cfg, out_dir)
    if t.method == "cps" and state.peer is None:  # network B: seed + 1's stage A (cached when shared)
        state.peer = _trained_peer(state, bundle, stage_a_cache)

    cssl_on = t.use_cl or t.use_cr
    while state.round < t.max_rounds:
        state.start_round()
        record: dict[str, Any] = {"stage": "round", "round": state.round}
        if t.method in ROUND_METHODS and bundle.unlabelled_images.shape[0]:  # a baseline cell (issue 11)
            record.update(_baseline_round(state, cfg, bundle))
        elif cssl_on:
            state.take_snapshot(cfg, bundle.unlabelled_images)  # the model label_round labels with
            u = bundle.unlabelled_images
            pseudo, pstats = label_round(state.model, cfg, u, hidden_masks=bundle.unlabelled_masks_hidden,
                                         class_names=bundle.class_names, labelled_images=bundle.labelled_images
                                         ) if u.shape[0] else (u[:, 0].long(), {})
            record.update(pstats)
            state.check_coverage(pstats, bundle.class_names)
            plan = epoch_plan(u.shape[0], cfg, state.streams)
            steps = local_steps(cfg, state.round, plan, u, pseudo, bundle.labelled_images, bundle.labelled_masks)
            record.update(state.l_tot_epoch(cfg, steps, len(plan),
                                            labelled=(bundle.labelled_images, bundle.labelled_masks)))
            state.check_patches(record)
        record.update(supervised_epoch(state.model, state.optimizer, bundle.labelled_images,
                                       bundle.labelled_masks, **sup))
        if state.peer is not None:  # CPS's network B: its own fine-tune epoch (its own batches)
            state.peer.start_round()
            peer = supervised_epoch(state.peer.model, state.peer.optimizer, bundle.labelled_images,
                                    bundle.labelled_masks, **_sup_args(state.peer, state.peer.cfg))
            record["loss_sup_peer"] = peer["loss_sup"]
        state.track_best(validate_and_record(record))
        stop = state.should_stop(record)
        save_round(state, cfg, out_dir)
        if stop:
            break
    bar.close()

    return evaluate_best(state, cfg, bundle, out_dir, start)


def _sup_args(state: RunState, cfg: Config) -> dict[str, Any]:
    """``supervised_epoch``'s settings for ``state`` (its own batch stream and scaler)."""
    t = cfg.train
    return dict(batch_size=t.batch_size, steps=t.sup_steps_per_epoch, augment=t.augment,
                ignore_index=cfg.pseudo.ignore_index, generator=state.streams.sup, precision=state.precision,
                scaler=state.scaler, sup_loss=t.sup_loss)


def _stage_a(state: RunState, cfg: Config, bundle: DataBundle, stage_a_cache: str | Path | None,
             validate: Callable[[dict[str, Any]], dict[str, float]],
             emit: Callable[[dict[str, Any]], None]) -> None:
    """Stage A of ``state`` (or the shared copy another run with the same ``stage_a_key`` trained)."""
    with _shared_stage_a(stage_a_cache, cfg) as shared:
        if shared is not None and shared.exists():  # another run trained this exact stage A
            state.load_state_dict(ckpt.load(shared, map_location="cpu"))
            for record in state.history:
                emit(record)
            return
        sup = _sup_args(state, cfg)
        pretrained: dict[str, float] = {}
        if cfg.train.method == "simclr_pretrain" and not state.history:  # before stage A's first epoch
            generator = torch.Generator().manual_seed(stream_seed(cfg.train.seed, "simclr"))
            pretrained = simclr_pretrain(state.model, bundle.labelled_images, bundle.unlabelled_images, cfg, generator)
        plan = stage_a_plan(cfg.train, bundle.labelled_images.shape[0])
        for epoch in range(len(state.history), len(plan)):
            stats = supervised_epoch(state.model, state.optimizer, bundle.labelled_images, bundle.labelled_masks,
                                     **{**sup, "steps": plan[epoch]})
            val = validate({"stage": "supervised", "round": 0, "epoch": epoch, "stage_a_step": sum(plan[:epoch + 1]),
                            **stats, **pretrained})
            pretrained = {}
            if state.after_stage_a_epoch(epoch, val, stats["loss_sup"]):  # the plateau scheduler, early stopping
                break
        state.finish_stage_a()
        if shared is not None:
            ckpt.save_atomic(state.state_dict(), shared)


def _trained_peer(state: RunState, bundle: DataBundle, stage_a_cache: str | Path | None) -> RunState:
    """CPS's network B after its stage A (``baselines.rounds.peer_config``), leaving this run's global
    random state as it was."""
    device = next(state.model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        peer = state.make_peer()
        _stage_a(peer, peer.cfg, bundle, stage_a_cache, lambda record: validate_record(peer, peer.cfg, bundle, record),
                 lambda record: None)
    return peer


def _baseline_round(state: RunState, cfg: Config, bundle: DataBundle) -> dict[str, Any]:
    """A baseline cell's unlabelled epoch in the steps a CSSL cell would take (``baselines.rounds``);
    pseudo_label first labels D_U with the round's model, as CSSL does."""
    u, record, pseudo = bundle.unlabelled_images, {}, None
    if cfg.train.method == "pseudo_label":
        state.take_snapshot(cfg, u)
        pseudo, record = label_round(state.model, cfg, u, hidden_masks=bundle.unlabelled_masks_hidden,
                                     class_names=bundle.class_names, labelled_images=bundle.labelled_images)
        state.check_coverage(record, bundle.class_names)
    plan = epoch_plan(u.shape[0], cfg, state.streams)
    steps = baseline_steps(plan, u, pseudo, bundle.labelled_images, bundle.labelled_masks)
    return {**record, **state.baseline_epoch(cfg, steps, len(plan))}


STAGE_A_TRAIN_KEYS = ("seed", "batch_size", "stage_a_steps", "stage_a_patience", "sup_steps_per_epoch",
                      "sup_loss", "augment", "device", "num_threads", "amp", "channels_last")
# + train.selection(): stage A's early stop, the weights it goes on from and the best it hands the
# rounds (best_score, best_val, best_model) all follow the selection metric




ROUND_OPTIM = ("cssl_lr", "finetune_lr", "round_warmup_steps", "round_schedule")  # set at round 1 (begin_rounds)


def stage_a_key(cfg: Config) -> str:
    """Hash of everything stage A depends on (data, model, optimiser, seed, supervised schedule, the
    ignore label, the validation batch, the selection metric and mode, torch's version); nothing of
    L_CL / L_CR enters it."""
    d = to_dict(cfg)
    optim = {k: v for k, v in d["optim"].items() if k not in ROUND_OPTIM}  # the rounds' rates: not stage A
    kept = {"data": d["data"], "model": d["model"], "optim": optim, "ignore_index": d["pseudo"]["ignore_index"],
            "val_batch": d["consistency"]["batch_size"], "torch": torch.__version__,
            "train": {k: d["train"][k] for k in STAGE_A_TRAIN_KEYS}, "select": list(cfg.train.selection())}
    if cfg.train.method == "simclr_pretrain":  # stage A starts from the pretrained weights
        kept["simclr"] = {k: v for k, v in d["baselines"].items() if k.startswith("simclr_")}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:20]


@contextmanager
def _shared_stage_a(folder: str | Path | None, cfg: Config) -> Iterator[Path | None]:
    """The shared stage-A file for ``cfg`` (None without a folder), under an exclusive lock: a
    concurrent run with the same key waits for this one's stage A instead of repeating it."""
    if folder is None or cfg.train.stage_a_steps == 0:
        yield None
        return
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    key = stage_a_key(cfg)
    with open(folder / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield folder / f"stage_a_{key}.pt"
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


