"""The run's state machine, written once for both schedules (``cssl_ray.run.local``, ``cssl_ray.distributed.ray_train``).

    stage A   train.stage_a_steps supervised steps on D_L in epochs of train.sup_steps_per_epoch
              (``stage_a_plan``), validating after each, the rate cut 0.1x on plateaus of the training
              loss (optim.plateau_metric); the rounds start from its last weights (the paper's converged
              supervised model). Optional early stopping: train.stage_a_patience epochs without a
              better train.select_metric, then on from the best weights
    round r   (round 1 first gives L_tot its own Adam at optim.cssl_lr and sets the fine-tune rate to
              optim.finetune_lr: ``RunState.begin_rounds``; docs/science.md says why)
              pseudo-label D_U (B) -> class-wise patches (C) -> one L_tot epoch, a pass over D_U
              -> one supervised fine-tune epoch on D_L -> validate -> checkpoint
    stop      train.stop: after train.max_rounds (default), or when the round's training loss has
              plateaued (the paper's rule); the same rule for every cell
    test      once, on the best-validation weights; never tuned on test data

"Best" is by ``train.select_metric`` (``cssl_ray.run.selection``); the supervised epochs' lengths are
``cssl_ray.run.supervised_epochs``'s, the rounds' warnings ``cssl_ray.run.round_warnings``'s.

``RunState`` holds everything a checkpoint restores: the model, the supervised optimiser and stage
A's plateau scheduler, L_tot's optimiser, the random streams (``cssl_ray.method.streams``), the teacher,
the auxiliary Gaussian, omega, the best weights, the history, the Fig. 2 snapshots and, under
``train.amp: fp16``, the two loss scalers. It draws no random number of its own.
"""
from __future__ import annotations

import copy
import itertools
import logging
import math
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from cssl_ray.config import Config
from cssl_ray.evaluation.figures import SNAPSHOT_IMAGES, pseudo_snapshot
from cssl_ray.method.collectives import Collectives
from cssl_ray.method.consistency import Teacher, noise_variance
from cssl_ray.method.contrastive import AuxiliaryGaussian
from cssl_ray.method.streams import RandomStreams
from cssl_ray.models import create_model
from cssl_ray.models.precision import Precision
from cssl_ray.run.baseline_rounds import BaselineStep, baseline_epoch, peer_config
from cssl_ray.run.loop import cssl_epoch, measure_omega
from cssl_ray.run.plan import StepData
from cssl_ray.run.round_warnings import coverage_warnings, patches_warning
from cssl_ray.run.selection import beats, selection_score, worst_score

log = logging.getLogger(__name__)

class RunState:
    """Everything a round checkpoint restores, and the rules that move it on."""

    def __init__(self, cfg: Config, device: torch.device, rank: int = 0, precision: Precision | None = None):
        """``precision``: default ``train.amp`` / ``train.channels_last`` on ``device`` (fp16 needs CUDA)."""
        t = cfg.train
        self.cfg = cfg
        torch.manual_seed(t.seed)  # the initial weights: the same in every cell of a seed
        self.precision = precision or Precision.from_config(t, device)
        self.model: nn.Module = self.precision.prepare_model(
            create_model(cfg.model, cfg.data.in_channels, cfg.data.num_classes).to(device))
        # fp16's loss scalers (None otherwise), one per loss: L_CL's gradients are 20-160x L_sup's
        # (OptimConfig), so one shared scale would sit too low for the supervised steps
        self.scaler = self.precision.grad_scaler()  # supervised steps
        self.cssl_scaler = self.precision.grad_scaler()  # L_tot steps
        self.optimizer = self._adam(cfg.optim.lr)
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.optimizer, mode="min", factor=cfg.optim.plateau_factor, patience=cfg.optim.plateau_patience)
        self.rank = rank
        self.streams = RandomStreams(t.seed, rank)
        self.teacher: Teacher | None = None
        if t.use_cr:
            self.teacher = Teacher(self.model, cfg.consistency.teacher, cfg.consistency.ema_decay)
        # One foreground class: the auxiliary Gaussian is the negative class (fixed from the seed).
        self.aux: AuxiliaryGaussian | None = None
        if cfg.data.num_classes == 2 and (t.use_cl or t.use_cr):
            self.aux = AuxiliaryGaussian(cfg.model.embed_dim, cfg.contrastive.aux_sigma, seed=t.seed)
        self.omega: float | None = None
        self.ema: nn.Module | None = None  # train.method mean_teacher: the EMA teacher (from round 1)
        self.peer: RunState | None = None  # train.method cps: network B, its own state (``make_peer``)
        self.round = 0
        self.stage_a_done = False
        self.stage_a_best_epoch = -1
        self.cssl_optimizer: torch.optim.Adam | None = None  # L_tot's own Adam (rounds; optim.cssl_lr)
        self.finetune_base_lr = cfg.optim.lr  # the supervised rate of the rounds, set at round 1
        self.l_tot_steps = 0  # optimiser steps of L_tot epochs since round 1 (the warm-up's clock)
        metric, self.select_mode = t.selection()
        self.select_key = metric.removeprefix("val_")  # its key in loop.evaluate's dict
        self.best_score = worst_score(self.select_mode)  # best_val[select_key]
        # track_best's comparison: (key in loop.evaluate's dict, mode), the selection first (beats)
        self.select_order = [(k.removeprefix("val_"), m) for k, m in t.selection_order()]
        self.best_round = 0
        self.best_val: dict[str, float] = {}
        self.best_model: dict[str, torch.Tensor] = {}
        self.best_loss = math.inf  # train.stop = loss_plateau
        self.rounds_since_improvement = 0
        self.warnings: list[str] = []  # one line each, e.g. a class with too little pseudo-label coverage
        self.history: list[dict[str, Any]] = []
        # (round, (k, H, W) uint8 pseudo-labels of the first k images of D_U): Fig. 2 (cssl_ray.evaluation.figures)
        self.snapshots: list[tuple[int, np.ndarray]] = []

    def _adam(self, lr: float, with_peer: bool = False) -> torch.optim.Adam:
        params = list(self.model.parameters())
        if with_peer and self.peer is not None:  # CPS: one Adam steps both networks (per-parameter: as two)
            params += list(self.peer.model.parameters())
        return torch.optim.Adam(params, lr=lr, weight_decay=self.cfg.optim.weight_decay)

    def make_peer(self) -> RunState:
        """CPS's network B (``baselines.rounds.peer_config``). Its construction seeds the global RNG:
        callers keep theirs (``local._trained_peer`` forks it; ``load_state_dict`` sets it after)."""
        return RunState(peer_config(self.cfg), next(self.model.parameters()).device, rank=self.rank,
                        precision=self.precision)

    # -- checkpoints ---------------------------------------------------------------------------

    _PLAIN = ("omega", "round", "stage_a_done", "stage_a_best_epoch", "finetune_base_lr",
              "l_tot_steps", "best_score", "best_round", "best_val", "best_model", "best_loss",
              "rounds_since_improvement", "warnings", "history")

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "cssl_optimizer": self.cssl_optimizer.state_dict() if self.cssl_optimizer else None,
            "scheduler": self.scheduler.state_dict(), "streams": self.streams.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "teacher": self.teacher.state_dict() if self.teacher else None,
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "peer": self.peer.state_dict() if self.peer is not None else None,
            "aux": self.aux.state_dict() if self.aux else None,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "cssl_scaler": self.cssl_scaler.state_dict() if self.cssl_scaler is not None else None,
            **{k: getattr(self, k) for k in self._PLAIN},
            "snapshots": [(r, torch.from_numpy(a)) for r, a in self.snapshots],  # tensors: weights_only-loadable
        }

    def load_state_dict(self, s: dict[str, Any]) -> None:
        self.peer = None
        if s.get("peer") is not None:  # first: its load sets the global RNG, this run's is set below
            self.peer = self.make_peer()
            self.peer.load_state_dict(s["peer"])
        self.model.load_state_dict(s["model"])
        self.optimizer.load_state_dict(s["optimizer"])
        self.cssl_optimizer = None
        if s["cssl_optimizer"] is not None:
            self.cssl_optimizer = self._adam(self.cfg.optim.cssl_lr, with_peer=True)
            self.cssl_optimizer.load_state_dict(s["cssl_optimizer"])
        self.scheduler.load_state_dict(s["scheduler"])
        self.streams.load_state_dict(s["streams"])
        torch.set_rng_state(s["torch_rng"])
        if self.teacher is not None and s["teacher"] is not None:
            self.teacher.load_state_dict(s["teacher"])
        self.ema = None
        if s.get("ema") is not None:
            self.ema = self._frozen_copy()
            self.ema.load_state_dict(s["ema"])
        if self.aux is not None and s["aux"] is not None:
            self.aux.load_state_dict(s["aux"])
        for name in ("scaler", "cssl_scaler"):  # absent from fp32 / bf16 runs and older checkpoints
            if getattr(self, name) is not None and s.get(name) is not None:
                getattr(self, name).load_state_dict(s[name])
        if "best_score" not in s:  # checkpoints before train.select_metric held best_dice: rescore best_val
            s = {**s, "best_score": selection_score(s["best_val"], self.select_key, self.select_mode)}
        for k in self._PLAIN:
            setattr(self, k, s[k])
        self.snapshots = [(int(r), np.asarray(a, dtype=np.uint8)) for r, a in s.get("snapshots", [])]

    # -- stage A -------------------------------------------------------------------------------

    def after_stage_a_epoch(self, epoch: int, val: dict[str, float], train_loss: float = math.nan) -> bool:
        """After a stage-A epoch and its validation: step the plateau scheduler on
        ``optim.plateau_metric`` (the epoch's mean ``train_loss``, or ``val["loss"]``), keep the best
        weights (``train.select_metric``, the run's selection); True when stage A should stop early
        (``train.stage_a_patience`` > 0 epochs without a better one).

        Early stopping is off by default: on a handful of validation images it stopped stage A at a
        fraction of its convergence, uncalibrated (docs/science.md)."""
        watched = train_loss if self.cfg.optim.plateau_metric == "train_loss" else val.get("loss", math.nan)
        if not math.isnan(watched):
            self.scheduler.step(watched)
        if self.track_best(val):
            self.stage_a_best_epoch = epoch
        patience = self.cfg.train.stage_a_patience
        return patience > 0 and epoch - self.stage_a_best_epoch >= patience

    def finish_stage_a(self) -> None:
        """The rounds start from, and must beat (best_round 0), stage A's model: with early stopping
        (``train.stage_a_patience`` > 0) its best weights; without, its last weights, which then
        also become the best so far (the whole budget ran; an earlier epoch's better score on a
        handful of validation images is noise, not a reason to throw the later steps away)."""
        if self.cfg.train.stage_a_patience > 0 and self.best_model:
            self.model.load_state_dict(self.best_model)
        else:
            last = next((h for h in reversed(self.history) if h.get("stage") == "supervised"), None)
            if last is not None:
                self.best_val = {k.removeprefix("val_"): v for k, v in last.items() if k.startswith("val_")}
                self.best_score = selection_score(self.best_val, self.select_key, self.select_mode)
                self.best_model = copy.deepcopy({k: v.detach().cpu() for k, v in self.model.state_dict().items()})
                self.best_round = 0
                self.stage_a_best_epoch = int(last.get("epoch", -1))
        self.stage_a_done = True

    # -- the rounds ----------------------------------------------------------------------------

    def begin_rounds(self) -> None:
        """Round 1's start (``OptimConfig`` says why): L_tot gets its own Adam at ``optim.cssl_lr``
        (0: it shares the supervised one, the paper's letter); the supervised Adam continues at
        ``optim.finetune_lr`` (0: at the rate stage A ended at). The plateau scheduler stays with
        stage A: a rate cut by validation would differ between the cells of an ablation."""
        o, t = self.cfg.optim, self.cfg.train
        if t.method == "cps" and self.peer is None:
            raise RuntimeError("train.method cps: set RunState.peer (network B) before the rounds")
        if o.cssl_lr > 0 and (t.use_cl or t.use_cr or t.method != "cssl"):  # a baseline's steps: the same rate
            self.cssl_optimizer = self._adam(o.cssl_lr, with_peer=True)
        if t.method == "mean_teacher":  # the teacher starts as the supervised model (SSL4MIS: the initial one)
            self.ema = self._frozen_copy()
        self.finetune_base_lr = o.finetune_lr or self.optimizer.param_groups[0]["lr"]
        self.l_tot_steps = 0

    def _frozen_copy(self) -> nn.Module:
        """A copy of the student that never receives gradients (Mean Teacher's EMA teacher)."""
        ema = copy.deepcopy(self.model)
        for p in ema.parameters():
            p.requires_grad_(False)
        return ema

    def round_decay(self) -> float:
        """Per-round factor of both rates: 1 (constant), or cosine from round 1 towards 0 past max_rounds."""
        if self.cfg.optim.round_schedule == "cosine" and self.cfg.train.max_rounds > 0:
            return 0.5 * (1.0 + math.cos(math.pi * (max(self.round, 1) - 1) / self.cfg.train.max_rounds))
        return 1.0

    def cssl_lr(self) -> float:
        """L_tot's rate now: ``optim.cssl_lr`` with its linear warm-up over the first
        ``optim.round_warmup_steps`` L_tot steps, times the round's decay."""
        o = self.cfg.optim
        warm = min(1.0, (self.l_tot_steps + 1) / o.round_warmup_steps) if o.round_warmup_steps > 0 else 1.0
        return o.cssl_lr * warm * self.round_decay()

    def set_round_lr(self) -> None:
        if self.cssl_optimizer is not None:
            for group in self.cssl_optimizer.param_groups:
                group["lr"] = self.cssl_lr()
        for group in self.optimizer.param_groups:
            group["lr"] = self.finetune_base_lr * self.round_decay()

    def after_l_tot_step(self) -> None:
        """Called after every optimiser step of an L_tot epoch (the warm-up's clock)."""
        self.l_tot_steps += 1
        self.set_round_lr()

    def start_round(self) -> None:
        if self.round == 0:
            self.begin_rounds()
        self.round += 1
        self.set_round_lr()

    def take_snapshot(self, cfg: Config, unlabelled_images: torch.Tensor) -> None:
        """Keep this round's pseudo-labels of the first images of D_U (Fig. 2), if figures are on.
        Call with the model that labels the round; it draws no random numbers."""
        if not cfg.train.figures or unlabelled_images.shape[0] == 0:
            return
        snap = pseudo_snapshot(self.model, unlabelled_images[:SNAPSHOT_IMAGES], cfg)
        self.snapshots = [(r, a) for r, a in self.snapshots if r != self.round] + [(self.round, snap)]

    def check_coverage(self, stats: dict[str, float], class_names: list[str]) -> None:
        """Round 1: warn (log and ``warnings``, which tracking turns into a tag and the report into a
        note) about every class of D_U whose pseudo-labels are (almost) gone
        (``round_warnings.coverage_warnings``)."""
        if self.round != 1:
            return
        for line in coverage_warnings(self.cfg, stats, class_names):
            self._warn(line)

    def check_patches(self, stats: dict[str, float]) -> None:
        """Warn once per run when L_CL's realised contrastive batch (``patches_per_step``) is under 80% of
        ``patches.batch_size`` (``round_warnings.patches_warning``)."""
        if any("patches per step" in w for w in self.warnings):
            return
        if (line := patches_warning(self.cfg, self.round, stats)) is not None:
            self._warn(line)

    def _warn(self, line: str) -> None:
        log.warning("[cssl_ray] %s", line)
        self.warnings.append(line)

    def l_tot_epoch(self, cfg: Config, steps: Iterable[StepData], n_steps: int,
                    collectives: Any = None, labelled: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, float]:
        """The round's L_tot epoch over ``steps`` (``loop.cssl_epoch``): lambda_ from the last epoch's
        omega (round 1: omega of the supervised model's own embeddings of the first step's patches),
        the teacher, the epoch, the new omega."""
        record: dict[str, float] = {}
        steps = iter(steps)
        if self.omega is None and n_steps:
            first = next(steps)
            omega0 = measure_omega(self.model, first.patches, first.classes, cfg, self.aux, self.streams, collectives)
            steps = itertools.chain([first], steps)
            if not math.isnan(omega0):
                self.omega = omega0
                record["omega_before"] = omega0
        omega = 0.0 if self.omega is None else self.omega  # no patch at all: neutral
        lambda_ = noise_variance(omega, cfg.consistency.eps)
        if self.teacher is not None and (cfg.consistency.teacher == "previous" or self.round == 1):
            # previous: the network as it was at the end of the last epoch; ema: start the
            # average from the supervised model, not from the random initialisation
            self.teacher.snapshot(self.model)
        stats = cssl_epoch(self.model, self.teacher, self.cssl_optimizer or self.optimizer, steps, n_steps, cfg,
                           lambda_=lambda_, aux=self.aux, streams=self.streams, collectives=collectives,
                           after_step=self.after_l_tot_step, scaler=self.cssl_scaler, labelled=labelled)
        stats["lr_cssl"] = (self.cssl_optimizer or self.optimizer).param_groups[0]["lr"]
        if not math.isnan(stats["omega"]):
            self.omega = stats["omega"]
        return {"lambda": lambda_, **record, **stats}

    def baseline_epoch(self, cfg: Config, steps: Iterable[BaselineStep], n_steps: int,
                       collectives: Collectives | None = None) -> dict[str, float]:
        """A baseline cell's unlabelled epoch (``baselines.rounds.baseline_epoch``; ``train.method``),
        on L_tot's optimiser and clock: the same steps, rate and warm-up as a CSSL cell's
        (``collectives``: this rank's steps of a data-parallel epoch)."""
        b = cfg.baselines
        ramp = (b.mt_rampup_rounds or cfg.train.max_rounds) * n_steps
        stats = baseline_epoch(self.model, self.cssl_optimizer or self.optimizer, iter(steps), cfg, teacher=self.ema,
                               peer=self.peer.model if self.peer is not None else None, step0=self.l_tot_steps,
                               rampup_steps=ramp, generator=self.streams.noise, precision=self.precision,
                               scaler=self.cssl_scaler, after_step=self.after_l_tot_step, collectives=collectives)
        stats["lr_cssl"] = (self.cssl_optimizer or self.optimizer).param_groups[0]["lr"]
        return stats

    def track_best(self, val: dict[str, float]) -> bool:
        """Keep these weights if ``val`` (``loop.evaluate``'s dict) is better than the best so far by
        ``train.select_metric`` (``is_better``); True when it is."""
        if not beats(val, self.best_val, self.select_order):
            return False
        score = selection_score(val, self.select_key, self.select_mode)
        self.best_score, self.best_round, self.best_val = score, self.round, dict(val)
        self.best_model = copy.deepcopy({k: v.detach().cpu() for k, v in self.model.state_dict().items()})
        return True

    def should_stop(self, record: dict[str, Any]) -> bool:
        """The stop rule after a round (``train.stop``), the same for every cell."""
        t = self.cfg.train
        if t.stop == "max_rounds":
            return False
        loss = record.get("loss", record.get("loss_sup", math.nan))  # L_tot; the fine-tune loss without it
        if loss < self.best_loss - t.plateau_delta:
            self.best_loss, self.rounds_since_improvement = loss, 0
        else:
            self.rounds_since_improvement += 1
        return self.rounds_since_improvement >= t.plateau_rounds
