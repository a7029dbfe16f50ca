"""The whole CSSL schedule in one process (no Ray): stage A, then rounds, then test.

The rules (stage A's early stop, the rounds' rate, the stop rule, the best weights) live in
``cssl_ray.schedule.RunState``; this module drives them in one process. With use_cl = use_cr = False
the rounds hold only the fine-tune epoch: the fully supervised baseline, with bit-identical
supervised batches to the CSSL cells of the same seed (``cssl_ray.streams``).
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cssl_ray import checkpoint as ckpt
from cssl_ray.baselines.rounds import ROUND_METHODS, baseline_steps
from cssl_ray.baselines.simclr import simclr_pretrain
from cssl_ray.config import Config, check_metric, dump_config, to_dict, validate
from cssl_ray.data.bundle import DataBundle, DataSource, load_bundle
from cssl_ray.data.splits import write_split
from cssl_ray.figures import write_run_figures
from cssl_ray.loop import epoch_plan, evaluate, label_round, local_steps, supervised_epoch
from cssl_ray.models import check_geometry
from cssl_ray.schedule import RunState, beats, stage_a_plan
from cssl_ray.streams import stream_seed


@dataclass
class RunResult:
    test: dict[str, float]
    best_val: dict[str, float]
    best_round: int  # 0 = end of the supervised stage
    history: list[dict[str, Any]] = field(default_factory=list)
    out_dir: Path | None = None
    seconds: float = 0.0
    test_last: dict[str, float] = field(default_factory=dict)  # the last round's weights (not selected)
    last_round: int = 0


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def run_local(cfg: Config, *, resume: bool = False, log: Callable[[dict[str, Any]], None] | None = None,
              stage_a_cache: str | Path | None = None) -> RunResult:
    """Train one CSSL run in this process; returns test metrics on the best-validation weights.
    ``train.protocol: joint`` runs ``cssl_ray.joint.run_joint`` instead (no stage A, no cache).

    ``stage_a_cache``: a folder shared by runs (an ablation's cells, a search's trials) where the
    state at the end of stage A is kept under ``stage_a_key(cfg)``: runs whose stage A would be
    identical (same data, model, optimiser, seed and supervised schedule; the CSSL switches and
    hyperparameters do not enter stage A) load it instead of training it again. A run that loads it
    ends bit-identical to one that trained stage A itself (tests/test_stage_a_cache.py).
    """
    validate(cfg)
    if cfg.train.protocol == "joint":  # one loop from the initial weights: no stage A to share
        from cssl_ray.joint import run_joint
        return run_joint(cfg, resume=resume, log=log)
    check_geometry(cfg.model, cfg.data.image_size, cfg.patches.size)
    start = time.perf_counter()
    t = cfg.train
    if t.num_threads > 0:
        torch.set_num_threads(t.num_threads)
    device = resolve_device(t.device)
    bundle = load_bundle(cfg.data)
    check_metric("train.select_metric", t.select_metric, bundle.class_names)  # its class, now that it is known
    out_dir = write_run_files(cfg, bundle)
    state = RunState(cfg, device)
    if resume and (last := ckpt.latest_checkpoint(out_dir)) is not None:
        # CPU: torch.set_rng_state needs a CPU tensor; load_state_dict moves the rest to the device
        state.load_state_dict(ckpt.load(last, map_location="cpu"))
    emit = log or (lambda record: None)
    stage_a_epochs = len(stage_a_plan(t, bundle.labelled_images.shape[0]))
    bar = _progress(stage_a_epochs + t.max_rounds, t.progress)
    bar.update((stage_a_epochs if state.stage_a_done else len(state.history)) + state.round)  # resumed work

    def validate_and_record(record: dict[str, Any]) -> dict[str, float]:
        val = _validate(state, cfg, bundle, record)
        emit(record)
        bar.set_postfix(stage=record["stage"], dice=f"{val['dice_mean']:.3f}")
        bar.update(1)
        return val

    sup = _sup_args(state, cfg)
    if not state.stage_a_done:  # stage A (skipped when resuming past it)
        _stage_a(state, cfg, bundle, stage_a_cache, validate_and_record, emit)
        bar.n = stage_a_epochs  # early stopping skips the rest of the budget
        bar.refresh()
        _save_round(state, cfg, out_dir)
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
        _save_round(state, cfg, out_dir)
        if stop:
            break
    bar.close()

    return evaluate_best(state, cfg, bundle, out_dir, start)


def _sup_args(state: RunState, cfg: Config) -> dict[str, Any]:
    """``supervised_epoch``'s settings for ``state`` (its own batch stream and scaler)."""
    t = cfg.train
    return dict(batch_size=t.batch_size, steps=t.sup_steps_per_epoch, augment=t.augment,
                ignore_index=cfg.pseudo.ignore_index, generator=state.streams.sup, precision=state.precision,
                scaler=state.scaler)


def _validate(state: RunState, cfg: Config, bundle: DataBundle, record: dict[str, Any]) -> dict[str, float]:
    """Validate ``state.model``, append ``record`` (with the val
    metrics, lr and step) to the history; returns the val metrics."""
    val = evaluate(state.model, bundle.val_images, bundle.val_masks, num_classes=cfg.data.num_classes,
                   class_names=bundle.class_names, ignore_index=cfg.pseudo.ignore_index,
                   batch_size=cfg.consistency.batch_size, precision=state.precision)
    record.update({f"val_{k}": v for k, v in val.items()})
    record["lr"] = state.optimizer.param_groups[0]["lr"]
    state.history.append(record)
    record["step"] = len(state.history)  # validation index: MLflow's step, equal in local and Ray runs
    return val


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
            images = torch.cat([bundle.labelled_images, bundle.unlabelled_images])
            generator = torch.Generator().manual_seed(stream_seed(cfg.train.seed, "simclr"))
            pretrained = simclr_pretrain(state.model, images, cfg, generator)
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
        _stage_a(peer, peer.cfg, bundle, stage_a_cache, lambda record: _validate(peer, peer.cfg, bundle, record),
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
                      "augment", "device", "num_threads", "amp", "channels_last")
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


def write_run_files(cfg: Config, bundle: DataBundle | DataSource) -> Path:
    """train.out_dir with the resolved config and the split (the image names too, for real data)."""
    out_dir = Path(cfg.train.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, out_dir / "config.yaml")
    write_split(bundle.split, out_dir / "split.json")
    if bundle.names:  # real datasets: the image names behind the indices, so the split survives a re-prepare
        parts = bundle.split.to_dict()
        (out_dir / "split_names.json").write_text(json.dumps(
            {k: [bundle.names[i] for i in v] for k, v in parts.items()}, indent=1))
    return out_dir


def evaluate_best(state: RunState, cfg: Config, bundle: DataBundle, out_dir: Path, start: float) -> RunResult:
    """Test metrics (with AUPRC and the per-image HD95 / ASD / Dice), once, on the best-validation
    weights, and beside them (``test_last``: Dice, IoU) on the last round's weights, which a handful
    of validation images cannot hide; writes best.pt, result.json and (train.figures) the figures
    under out_dir/figures/."""
    test_last = evaluate(state.model, bundle.test_images, bundle.test_masks, num_classes=cfg.data.num_classes,
                         class_names=bundle.class_names, ignore_index=cfg.pseudo.ignore_index,
                         batch_size=cfg.consistency.batch_size, precision=state.precision)
    if state.best_model:  # else no validation ran (no epochs): test the weights as they are
        state.model.load_state_dict(state.best_model)
    test = evaluate(state.model, bundle.test_images, bundle.test_masks, num_classes=cfg.data.num_classes,
                    class_names=bundle.class_names, ignore_index=cfg.pseudo.ignore_index,
                    batch_size=cfg.consistency.batch_size, auprc=True, surface=True,
                    precision=state.precision)
    if cfg.train.figures:  # on the best weights, like the test; never fails the run
        write_run_figures(state, cfg, bundle, out_dir)
    ckpt.save_atomic({"model": state.best_model, "config": to_dict(cfg), "round": state.best_round,
                      "val": state.best_val, "test": test}, out_dir / "best.pt")
    result = RunResult(test=test, best_val=state.best_val, best_round=state.best_round,
                       history=state.history, out_dir=out_dir, seconds=time.perf_counter() - start,
                       test_last=test_last, last_round=state.round)
    (out_dir / "result.json").write_text(json.dumps(
        {"test": test, "best_val": state.best_val, "best_round": state.best_round,
         "test_last": test_last, "last_round": state.round, "rounds": rounds_summary(state.history, state.stage_a_best_epoch),
         "stage_a": {**stage_a_summary(state.history, cfg.train.selection_order()),
                     "start_epoch": float(state.stage_a_best_epoch)}, "warnings": state.warnings,
         "seconds": result.seconds}, indent=2, allow_nan=True))
    return result


ROUND1_KEYS = ("pseudo_coverage/", "confidence/", "confidence_labelled/")


def rounds_summary(history: list[dict[str, Any]], start_epoch: int = -1) -> dict[str, float]:
    """The instruments a table needs beside the test: round 1's pseudo-label coverage and confidence
    per class (``round1_<key>``: the stage-A model labelling D_U), the realised contrastive batch per
    step averaged over the rounds (``patches_per_step_mean``) and the rounds' val dice_mean change
    (``val_dice_mean_last`` - the value the rounds started from, stage-A epoch ``start_epoch``'s:
    ``val_dice_mean_start``; -1 = the last epoch's)."""
    rounds = [h for h in history if h.get("stage") == "round"]
    out: dict[str, float] = {}
    if not rounds:
        return out
    out.update({f"round1_{k}": float(v) for k, v in rounds[0].items() if k.startswith(ROUND1_KEYS)})
    realised = [float(h["patches_per_step"]) for h in rounds if "patches_per_step" in h]
    if realised:
        out["patches_per_step_mean"] = sum(realised) / len(realised)
    stage_a = [h for h in history if h.get("stage") == "supervised"]
    start = next((h for h in stage_a if h.get("epoch") == start_epoch), stage_a[-1] if stage_a else {})
    if "val_dice_mean" in start:
        out["val_dice_mean_start"] = float(start["val_dice_mean"])
    out["val_dice_mean_last"] = float(rounds[-1].get("val_dice_mean", math.nan))
    return out


def stage_a_summary(history: list[dict[str, Any]],
                    order: list[tuple[str, str]] | None = None) -> dict[str, float]:
    """Stage A as the rounds found it: epochs run, the best epoch by ``order`` (the run's
    ``train.selection_order()``, default val_dice_mean: the weights the rounds start from, with
    ``train.stage_a_patience``) and its val dice_mean, val loss and selection metric; ties: the
    earlier epoch, as ``RunState.track_best``."""
    order = order or [("val_dice_mean", "max")]
    epochs = [h for h in history if h.get("stage") == "supervised"]
    if not epochs:
        return {}
    best: dict[str, Any] = {}
    for h in epochs:
        if beats(h, best, order):
            best = h
    best = best or epochs[0]
    return {"epochs": float(len(epochs)), "best_epoch": float(best["epoch"]),
            "steps": float(epochs[-1].get("stage_a_step", math.nan)), "last_lr": float(epochs[-1].get("lr", math.nan)),
            **{k: float(best.get(k, math.nan)) for k in ("val_dice_mean", "val_loss", order[0][0])}}


def _save_round(state: RunState, cfg: Config, out_dir: Path) -> None:
    ckpt.save_atomic({**state.state_dict(), "config": to_dict(cfg)}, ckpt.round_path(out_dir, state.round))
    ckpt.prune(out_dir, cfg.train.keep_checkpoints)


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm
    return tqdm(total=total, disable=not enabled, desc="cssl", unit="epoch", dynamic_ncols=True)
