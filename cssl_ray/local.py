"""The whole CSSL schedule in one process (no Ray): stage A, then rounds, then test.

    stage A   supervised epochs on D_L, validating after each (ReduceLROnPlateau on val loss)
    round r   pseudo-label D_U (B) -> class-wise patches (C) -> one L_tot epoch (CL + CR)
              -> one supervised fine-tune epoch on D_L -> validate -> checkpoint round_r.pt
    stop      after train.max_rounds, or when L_tot has not improved by train.plateau_delta for
              train.plateau_rounds rounds
    test      once, on the best-validation weights (val dice_mean); never tuned on test data

With use_cl = use_cr = False the rounds hold only the fine-tune epoch: the fully supervised
baseline with exactly the same supervised steps as the CSSL run.
"""
from __future__ import annotations

import copy
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

import numpy as np
import torch
from torch import nn

from cssl_ray import checkpoint as ckpt
from cssl_ray.config import Config, dump_config, to_dict, validate
from cssl_ray.consistency import Teacher, noise_variance
from cssl_ray.contrastive import AuxiliaryGaussian
from cssl_ray.data.bundle import DataBundle, load_bundle
from cssl_ray.data.splits import write_split
from cssl_ray.figures import SNAPSHOT_IMAGES, pseudo_snapshot, write_run_figures
from cssl_ray.loop import cssl_epoch, evaluate, round_patches, supervised_epoch
from cssl_ray.models import check_geometry, create_model


@dataclass
class RunResult:
    test: dict[str, float]
    best_val: dict[str, float]
    best_round: int  # 0 = end of the supervised stage
    history: list[dict[str, Any]] = field(default_factory=list)
    out_dir: Path | None = None
    seconds: float = 0.0


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class _State:
    """Everything a round checkpoint restores."""

    def __init__(self, cfg: Config, bundle: DataBundle, device: torch.device):
        t = cfg.train
        torch.manual_seed(t.seed)
        self.model: nn.Module = create_model(cfg.model, cfg.data.in_channels, cfg.data.num_classes).to(device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.optim.lr,
                                          weight_decay=cfg.optim.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.optimizer, mode="min", factor=cfg.optim.plateau_factor, patience=cfg.optim.plateau_patience)
        self.generator = torch.Generator().manual_seed(t.seed)
        self.teacher: Teacher | None = None
        if t.use_cr:
            self.teacher = Teacher(self.model, cfg.consistency.teacher, cfg.consistency.ema_decay)
        # One foreground class: the auxiliary Gaussian is the negative class (fixed from the seed).
        self.aux: AuxiliaryGaussian | None = None
        if cfg.data.num_classes == 2 and (t.use_cl or t.use_cr):
            self.aux = AuxiliaryGaussian(cfg.model.embed_dim, cfg.contrastive.aux_sigma, seed=t.seed)
        self.omega: float | None = None
        self.round = 0
        self.best_dice = -math.inf
        self.best_round = 0
        self.best_val: dict[str, float] = {}
        self.best_model: dict[str, torch.Tensor] = {}
        self.best_loss_tot = math.inf
        self.rounds_since_improvement = 0
        self.history: list[dict[str, Any]] = []
        # (round, (k, H, W) uint8 pseudo-labels of the first k images of D_U): Fig. 2 (cssl_ray.figures)
        self.snapshots: list[tuple[int, np.ndarray]] = []

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "teacher": self.teacher.state_dict() if self.teacher else None,
            "aux": self.aux.state_dict() if self.aux else None,
            "omega": self.omega, "round": self.round, "best_dice": self.best_dice,
            "best_round": self.best_round, "best_val": self.best_val, "best_model": self.best_model,
            "best_loss_tot": self.best_loss_tot, "rounds_since_improvement": self.rounds_since_improvement,
            "history": self.history,
            "snapshots": [(r, torch.from_numpy(a)) for r, a in self.snapshots],  # tensors: weights_only-loadable
        }

    def load_state_dict(self, s: dict[str, Any]) -> None:
        self.model.load_state_dict(s["model"])
        self.optimizer.load_state_dict(s["optimizer"])
        self.scheduler.load_state_dict(s["scheduler"])
        self.generator.set_state(s["generator"])
        torch.set_rng_state(s["torch_rng"])
        if self.teacher is not None and s["teacher"] is not None:
            self.teacher.load_state_dict(s["teacher"])
        if self.aux is not None and s["aux"] is not None:
            self.aux.load_state_dict(s["aux"])
        for k in ("omega", "round", "best_dice", "best_round", "best_val", "best_model", "best_loss_tot",
                  "rounds_since_improvement", "history"):
            setattr(self, k, s[k])
        # checkpoints from before the figures have no snapshots
        self.snapshots = [(int(r), np.asarray(a, dtype=np.uint8)) for r, a in s.get("snapshots", [])]

    def take_snapshot(self, cfg: Config, unlabelled_images: torch.Tensor) -> None:
        """Keep this round's pseudo-labels of the first images of D_U (Fig. 2), if figures are on.
        Call with the model that labels the round; it draws no random numbers."""
        if not cfg.train.figures or unlabelled_images.shape[0] == 0:
            return
        snap = pseudo_snapshot(self.model, unlabelled_images[:SNAPSHOT_IMAGES], cfg)
        self.snapshots = [(r, a) for r, a in self.snapshots if r != self.round] + [(self.round, snap)]

    def l_tot_epoch(self, cfg: Config, patches: torch.Tensor, classes: torch.Tensor, unlabelled: torch.Tensor,
                    collectives: Any = None) -> dict[str, float]:
        """The round's L_tot epoch: lambda_ from the last epoch's omega, the teacher, the epoch, the new omega."""
        omega = 0.0 if self.omega is None else self.omega  # neutral before the first epoch
        lambda_ = noise_variance(omega, cfg.consistency.eps)
        if self.teacher is not None and (cfg.consistency.teacher == "previous" or self.round == 1):
            # previous: the network as it was at the end of the last epoch; ema: start the
            # average from the supervised model, not from the random initialisation
            self.teacher.snapshot(self.model)
        stats = cssl_epoch(self.model, self.teacher, self.optimizer, patches, classes, unlabelled, cfg,
                           lambda_=lambda_, aux=self.aux, generator=self.generator, collectives=collectives)
        if not math.isnan(stats["omega"]):
            self.omega = stats["omega"]
        return {"lambda": lambda_, **stats}

    def track_best(self, val: dict[str, float]) -> None:
        dice = val.get("dice_mean", float("nan"))
        if not math.isnan(dice) and dice >= self.best_dice:
            self.best_dice, self.best_round, self.best_val = dice, self.round, dict(val)
            self.best_model = copy.deepcopy({k: v.detach().cpu() for k, v in self.model.state_dict().items()})


def run_local(cfg: Config, *, resume: bool = False, log: Callable[[dict[str, Any]], None] | None = None,
              stage_a_cache: str | Path | None = None) -> RunResult:
    """Train one CSSL run in this process; returns test metrics on the best-validation weights.

    ``stage_a_cache``: a folder shared by runs (an ablation's cells, a search's trials) where the
    state at the end of stage A is kept under ``stage_a_key(cfg)``: runs whose stage A would be
    identical (same data, model, optimiser, seed and supervised schedule; the CSSL switches and
    hyperparameters do not enter stage A) load it instead of training it again. A run that loads it
    ends bit-identical to one that trained stage A itself (tests/test_stage_a_cache.py).
    """
    validate(cfg)
    check_geometry(cfg.model, cfg.data.image_size, cfg.patches.size)
    start = time.perf_counter()
    t = cfg.train
    if t.num_threads > 0:
        torch.set_num_threads(t.num_threads)
    device = resolve_device(t.device)
    bundle = load_bundle(cfg.data)
    out_dir = write_run_files(cfg, bundle)
    state = _State(cfg, bundle, device)
    if resume and (last := ckpt.latest_checkpoint(out_dir)) is not None:
        # CPU: torch.set_rng_state needs a CPU tensor; load_state_dict moves the rest to the device
        state.load_state_dict(ckpt.load(last, map_location="cpu"))
    emit = log or (lambda record: None)
    total_epochs = t.supervised_epochs + t.max_rounds
    bar = _progress(total_epochs, t.progress)
    bar.update((t.supervised_epochs if state.history else 0) + state.round)  # resumed work

    def validate_and_record(record: dict[str, Any]) -> dict[str, float]:
        val = evaluate(state.model, bundle.val_images, bundle.val_masks, num_classes=cfg.data.num_classes,
                       class_names=bundle.class_names, ignore_index=cfg.pseudo.ignore_index,
                       batch_size=cfg.consistency.batch_size)
        state.scheduler.step(val["loss"])
        record.update({f"val_{k}": v for k, v in val.items()})
        record["lr"] = state.optimizer.param_groups[0]["lr"]
        state.history.append(record)
        record["step"] = len(state.history)  # validation index: MLflow's step, equal in local and Ray runs
        emit(record)
        bar.set_postfix(stage=record["stage"], dice=f"{val['dice_mean']:.3f}")
        bar.update(1)
        return val

    sup = dict(batch_size=t.batch_size, steps=t.sup_steps_per_epoch, augment=t.augment,
               ignore_index=cfg.pseudo.ignore_index, generator=state.generator)
    if state.round == 0 and not state.history:  # stage A (skipped when resuming past it)
        with _shared_stage_a(stage_a_cache, cfg) as shared:
            if shared is not None and shared.exists():  # another run trained this exact stage A
                state.load_state_dict(ckpt.load(shared, map_location="cpu"))
                for record in state.history:
                    emit(record)
                bar.update(len(state.history))
            else:
                for epoch in range(t.supervised_epochs):
                    stats = supervised_epoch(state.model, state.optimizer, bundle.labelled_images,
                                             bundle.labelled_masks, **sup)
                    state.track_best(validate_and_record({"stage": "supervised", "round": 0, "epoch": epoch,
                                                          **stats}))
                if shared is not None:
                    ckpt.save_atomic(state.state_dict(), shared)
        _save_round(state, cfg, out_dir)

    cssl_on = t.use_cl or t.use_cr
    while state.round < t.max_rounds:
        state.round += 1
        record: dict[str, Any] = {"stage": "round", "round": state.round}
        if cssl_on:
            state.take_snapshot(cfg, bundle.unlabelled_images)  # the model round_patches labels with
            started = time.perf_counter()
            patches, classes, pstats = round_patches(
                state.model, cfg, bundle.labelled_images, bundle.labelled_masks, bundle.unlabelled_images,
                generator=state.generator, hidden_masks=bundle.unlabelled_masks_hidden)
            record.update(pstats)
            record["patch_wait_s"] = time.perf_counter() - started  # labelling + sampling, in this process
            record["patches_per_s"] = pstats["patches"] / max(record["patch_wait_s"], 1e-9)
            record.update(state.l_tot_epoch(cfg, patches, classes, bundle.unlabelled_images))
        record.update(supervised_epoch(state.model, state.optimizer, bundle.labelled_images,
                                       bundle.labelled_masks, **sup))
        state.track_best(validate_and_record(record))
        stop = cssl_on and _plateaued(state, record["loss"], t.plateau_delta, t.plateau_rounds)
        _save_round(state, cfg, out_dir)
        if stop:
            break
    bar.close()

    return evaluate_best(state, cfg, bundle, out_dir, start)


STAGE_A_TRAIN_KEYS = ("seed", "batch_size", "supervised_epochs", "sup_steps_per_epoch", "augment", "device",
                      "num_threads")


def stage_a_key(cfg: Config) -> str:
    """Hash of everything stage A depends on (data, model, optimiser, seed, supervised schedule, the
    ignore label, the validation batch, torch's version); nothing of L_CL / L_CR enters it."""
    d = to_dict(cfg)
    kept = {"data": d["data"], "model": d["model"], "optim": d["optim"], "ignore_index": d["pseudo"]["ignore_index"],
            "val_batch": d["consistency"]["batch_size"], "torch": torch.__version__,
            "train": {k: d["train"][k] for k in STAGE_A_TRAIN_KEYS}}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:20]


@contextmanager
def _shared_stage_a(folder: str | Path | None, cfg: Config) -> Iterator[Path | None]:
    """The shared stage-A file for ``cfg`` (None without a folder), under an exclusive lock: a
    concurrent run with the same key waits for this one's stage A instead of repeating it."""
    if folder is None or cfg.train.supervised_epochs == 0:
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


def write_run_files(cfg: Config, bundle: DataBundle) -> Path:
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


def evaluate_best(state: _State, cfg: Config, bundle: DataBundle, out_dir: Path, start: float) -> RunResult:
    """Test metrics, once, on the best-validation weights; writes best.pt, result.json and
    (train.figures) the figures under out_dir/figures/."""
    if state.best_model:  # else no validation ran (no epochs): test the weights as they are
        state.model.load_state_dict(state.best_model)
    test = evaluate(state.model, bundle.test_images, bundle.test_masks, num_classes=cfg.data.num_classes,
                    class_names=bundle.class_names, ignore_index=cfg.pseudo.ignore_index,
                    batch_size=cfg.consistency.batch_size, auprc=True)
    if cfg.train.figures:  # on the best weights, like the test; never fails the run
        write_run_figures(state, cfg, bundle, out_dir)
    ckpt.save_atomic({"model": state.best_model, "config": to_dict(cfg), "round": state.best_round,
                      "val": state.best_val, "test": test}, out_dir / "best.pt")
    result = RunResult(test=test, best_val=state.best_val, best_round=state.best_round,
                       history=state.history, out_dir=out_dir, seconds=time.perf_counter() - start)
    (out_dir / "result.json").write_text(json.dumps(
        {"test": test, "best_val": state.best_val, "best_round": state.best_round,
         "seconds": result.seconds}, indent=2, allow_nan=True))
    return result


def _plateaued(state: _State, loss_tot: float, delta: float, patience: int) -> bool:
    if loss_tot < state.best_loss_tot - delta:
        state.best_loss_tot, state.rounds_since_improvement = loss_tot, 0
    else:
        state.rounds_since_improvement += 1
    return state.rounds_since_improvement >= patience


def _save_round(state: _State, cfg: Config, out_dir: Path) -> None:
    ckpt.save_atomic({**state.state_dict(), "config": to_dict(cfg)}, ckpt.round_path(out_dir, state.round))
    ckpt.prune(out_dir, cfg.train.keep_checkpoints)


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm
    return tqdm(total=total, disable=not enabled, desc="cssl", unit="epoch", dynamic_ncols=True)
