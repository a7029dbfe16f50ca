"""What a run writes and returns, the same for both protocols (``local`` and ``joint``): the run
folder (resolved config, split), a validation record per epoch or refresh, a checkpoint per round,
and the test on the best-validation weights beside the last ones (``RunResult``, result.json, best.pt).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cssl_ray.config import Config, check_metric, dump_config, to_dict
from cssl_ray.data.bundle import DataBundle, DataSource, load_bundle
from cssl_ray.data.splits import write_split
from cssl_ray.evaluation.figures import write_run_figures
from cssl_ray.models import check_geometry
from cssl_ray.run import checkpoint as ckpt
from cssl_ray.run.loop import evaluate
from cssl_ray.run.schedule import RunState
from cssl_ray.run.selection import beats


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


def validate_record(state: RunState, cfg: Config, bundle: DataBundle, record: dict[str, Any]) -> dict[str, float]:
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


def open_run(cfg: Config) -> tuple[torch.device, DataBundle, Path]:
    """The start both in-process protocols share, after ``validate(cfg)``: the model's geometry checked,
    torch's threads set, the device, the dataset loaded and split, the selection metric checked against
    its classes, and the run folder written. Returns (device, bundle, out_dir)."""
    check_geometry(cfg.model, cfg.data.image_size, cfg.patches.size)
    t = cfg.train
    if t.num_threads > 0:
        torch.set_num_threads(t.num_threads)
    device = resolve_device(t.device)
    bundle = load_bundle(cfg.data)
    check_metric("train.select_metric", t.select_metric, bundle.class_names)  # its class, now that it is known
    return device, bundle, write_run_files(cfg, bundle)


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


def save_round(state: RunState, cfg: Config, out_dir: Path) -> None:
    ckpt.save_atomic({**state.state_dict(), "config": to_dict(cfg)}, ckpt.round_path(out_dir, state.round))
    ckpt.prune(out_dir, cfg.train.keep_checkpoints)


def progress_bar(total: int, enabled: bool):
    from tqdm.auto import tqdm
    return tqdm(total=total, disable=not enabled, desc="cssl", unit="epoch", dynamic_ncols=True)
