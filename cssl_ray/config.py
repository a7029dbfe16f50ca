"""The typed config tree: the single source of every default.

Symbols follow Pandey et al., "Contrastive Semi-Supervised Learning for 2D Medical Segmentation"
(MICCAI 2021):

    tau        temperature of the contrastive loss (Eq. 1); default 0.1, must be > 0
    alpha      interpolation weight of a hard negative normalize(a z_i + (1-a) z_n), drawn per pair
               from U(alpha_min, alpha_max); paper (0, 0.4); 0 <= alpha_min < alpha_max <= 0.5
    omega      silhouette score of the patch embeddings, in [-1, 1]
    lambda_    noise variance of consistency regularisation, (omega + 1) / 2 + eps
    eps        small non-negative offset of lambda_

YAML only overrides these dataclasses (``load_config``). Unknown keys, wrong types and
out-of-range values raise ``ConfigError`` with one line naming the key and what is allowed.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A bad configuration value; the message is one line naming the key."""


# Validation record keys every run reports ("val_" + a ``loop.evaluate`` key): what a run can select
# its weights by (``train.select_metric``) and a search its trials by; per class also
# val_dice/<class> and val_iou/<class>, whose class names come with the data.
VAL_METRICS = ("val_loss", "val_dice_mean", "val_iou_mean")
PER_CLASS_VAL_METRICS = ("val_dice", "val_iou")


def natural_mode(metric: str) -> str:
    """The direction in which ``metric`` gets better: min for losses (val_loss, loss, loss_cl, ...), else max."""
    return "min" if metric.removeprefix("val_").startswith("loss") else "max"


def check_metric(key: str, metric: Any, classes: list[str] | None, extra: tuple[str, ...] = ()) -> None:
    """``ConfigError`` unless ``metric`` is a validation record key (``VAL_METRICS``, val_dice/<class>,
    val_iou/<class>) or one of ``extra``. ``classes``: the data's class names; None = not known yet,
    then any non-empty class name passes (the run checks it once it has the data)."""
    allowed = [*VAL_METRICS, *extra]
    if isinstance(metric, str) and metric in allowed:
        return
    head, _, cls = metric.partition("/") if isinstance(metric, str) else ("", "", "")
    if head in PER_CLASS_VAL_METRICS and cls and "/" not in cls:
        if classes is None or cls in classes:
            return
    if classes is None:
        per_class = [f"{m}/<class>" for m in PER_CLASS_VAL_METRICS]
    else:
        per_class = [f"{m}/{c}" for m in PER_CLASS_VAL_METRICS for c in classes]
    what = "a key the trials report" if extra else "a validation record key"
    raise ConfigError(f"{key}: {metric!r} is not {what}; allowed: {', '.join(allowed + per_class)}")


@dataclass
class DataConfig:
    name: str = "synthetic"  # a dataset card in datasets/ (synthetic, nuclei, monuseg, chaos, jsrt, idrid, folder)
    num_classes: int = 4  # C, including background 0; must equal the dataset's class count (the card's)
    image_size: tuple[int, int] = (128, 128)  # (H, W) every image is generated / resized to
    in_channels: int = 1  # image channels fed to the network; must equal the card's channels where it fixes them
    n_train: int = 40  # synthetic only: generated training images (labelled + unlabelled)
    n_val: int = 8  # synthetic only
    n_test: int = 16  # synthetic only
    labelled_fraction: float = 0.1  # share of training images (or groups) with masks (D_L); the rest is D_U
    labelled_count: int = 0  # if > 0, |D_L| exactly (overrides labelled_fraction); e.g. JSRT 25 or 50
    difficulty: float = 1.0  # synthetic only: 0 = easy, larger = noisier and more varied
    seed: int = 0  # seed of the data generation and of the split
    root: str = ""  # the dataset's folder; "" = data/<name> (nuclei: the wheel, downloaded with pip)
    cache_dir: str = ""  # prepared-dataset cache; "" = $CSSL_RAY_CACHE, else ~/.cache/cssl_ray
    normalise: Literal["auto", "percentile", "scale", "jsrt12", "none"] = "auto"  # auto = the card's method
    val_fraction: float = -1.0  # share of training groups carved into val when the set has no val; -1 = the card's
    test_fraction: float = -1.0  # the same for test; -1 = the card's (CHAOS: 0.15, by patient)
    # > 0: at least this many val images, training images (whole groups) moved to val, seeded, before
    # D_L is drawn; for sets whose fixed val is a handful of images (nuclei: 3), where selecting on
    # validation is noise. Real datasets only (synthetic: data.n_val)
    val_count: int = 0
    labelled_by: Literal["auto", "image", "group"] = "auto"  # unit of D_L; auto = the card's (CHAOS: group)


@dataclass
class ModelConfig:
    name: str = "attention_unet"  # a name in cssl_ray.models.registry
    base_channels: int = 64  # width of the first level; 64 gives the vanilla U-Net size
    depth: int = 4  # number of down-samplings; the network's stride is 2**depth
    embed_dim: int = 256  # output size of the projection head g (paper: 256)
    proj_hidden: int = 512  # hidden width of the 2-layer projection head
    encoder: str = "resnet18"  # timm encoder name for name == "timm_unet"
    pretrained: bool = False  # timm: never downloads; use encoder_weights for local weights
    encoder_weights: str = ""  # timm: path to a local state dict for the encoder


@dataclass
class PseudoConfig:
    threshold: float = 0.9  # softmax confidence a pixel needs to get a pseudo-label (the paper's high threshold)
    # class-wise rule (cssl_ray.method.pseudo_labels.confident_labels): in each image, the most confident
    # class_fraction of the pixels predicted as a class also pass, down to the hard floor tau_conf
    # (`floor`); 0 = the fixed threshold alone (the paper's letter). An uncalibrated model's 0.9
    # threshold left whole classes without a pseudo-label (docs/science.md)
    class_fraction: float = 0.0
    floor: float = 0.5  # tau_conf: no pixel under this confidence is ever pseudo-labelled
    ignore_index: int = 255  # label of pixels below the threshold


@dataclass
class PatchConfig:
    size: int = 64  # side of the square class-wise patch window
    min_pixels: int = 25  # pixels of the patch's class a window must hold
    mask: Literal["others_all", "others_foreground", "none"] = "others_all"
    # windows per image, shared equally by the foreground classes that have a valid window in it
    # (patches.dense_windows): every image gives its full budget, so a step's pool is about
    # per_image x (its images) whichever classes they hold; paper: 816 patches from 8 images, ~100 each.
    # Re-sampled every round from the current pseudo-labels.
    per_image: int = 102
    batch_size: int = 816  # patches per contrastive batch (paper: 816)


@dataclass
class ContrastiveConfig:
    tau: float = 0.1
    alpha_min: float = 0.0
    alpha_max: float = 0.4
    hard_ratio: float = 1.0  # hard : batch negatives; 1.0 = one hard negative per batch negative
    aux_samples: int = 0  # one-foreground-class data: auxiliary Gaussian negatives per batch (0 = batch size)
    # std per dimension of the auxiliary Gaussian N(mu, aux_sigma^2 I), |mu| = 1, before normalising;
    # 0.05 keeps it a compact cluster in 256-d (cos to mu ~0.8); 1.0 would be near-uniform on the sphere
    aux_sigma: float = 0.05


@dataclass
class SilhouetteConfig:
    kind: Literal["standard", "paper"] = "standard"
    metric: Literal["manhattan", "euclidean", "cosine"] = "manhattan"
    max_samples: int = 1024  # subsample size per batch for the standard (O(N^2)) silhouette


@dataclass
class ConsistencyConfig:
    eps: float = 0.01  # lambda_ = (omega + 1) / 2 + eps
    teacher: Literal["previous", "ema"] = "previous"  # frozen previous-epoch copy, or EMA
    ema_decay: float = 0.99
    perturb: Literal["bottleneck", "all_levels"] = "bottleneck"
    batch_size: int = 8  # full unlabelled images per consistency batch (paper: 8)
    # what lambda_ is the variance OF: "absolute" = the paper's letter, r ~ N(0, lambda_ I); "relative"
    # = r ~ N(0, lambda_ Var_c(h)), lambda_ times each bottleneck channel's own variance (measured on
    # the batch, detached), since lambda_ in [eps, 1 + eps] only makes sense against a feature scale
    # the paper does not state (docs/science.md)
    noise: Literal["absolute", "relative"] = "absolute"


@dataclass
class BaselinesConfig:
    """The semi-supervised baselines' own hyperparameters (``train.method``; cssl_ray.baselines)."""

    pseudo_weight: float = 1.0  # pseudo_label: weight of the CE on D_U's confident pseudo-labels
    mt_ema_decay: float = 0.99  # mean_teacher: EMA decay of the teacher (SSL4MIS 0.99)
    mt_weight: float = 0.1  # mean_teacher: final consistency weight (SSL4MIS 0.1)
    mt_rampup_rounds: int = 0  # mean_teacher: sigmoid ramp-up length in rounds; 0 = all rounds (SSL4MIS: its budget)
    mt_noise_std: float = 0.1  # mean_teacher: the teacher's input noise N(0, std^2), clamped at 2 std
    cps_weight: float = 1.5  # cps: weight of the cross pseudo supervision term (Chen et al. 2021: 1.5)
    simclr_epochs: int = 20  # simclr_pretrain: NT-Xent passes over D_L + D_U before stage A
    simclr_batch_size: int = 16  # simclr_pretrain: images per NT-Xent batch (2x views)
    simclr_temperature: float = 0.5  # simclr_pretrain: NT-Xent tau (Chen et al. 2020: 0.5 on CIFAR-10)


@dataclass
class OptimConfig:
    lr: float = 1e-3  # Adam
    weight_decay: float = 0.0
    plateau_factor: float = 0.1  # stage A only: ReduceLROnPlateau (the paper's 0.1x)
    plateau_patience: int = 5  # stage-A epochs without a better plateau_metric before a cut
    # what stage A's plateau watches: the epoch's training loss (the paper: the rate falls once the
    # supervised loss stops falling) or the validation loss (noisy on a handful of images)
    plateau_metric: Literal["train_loss", "val_loss"] = "train_loss"
    # The rounds (the same for every cell of an ablation; docs/science.md has the measurements):
    # cssl_lr > 0: each L_tot epoch steps its own Adam (created at round 1, fresh moments) at this rate.
    #   L_CL's gradient on the encoder is 20-160x L_sup's, and stage A's tiny second moments would turn
    #   the first L_tot steps into 1.5-3.4x lr per weight: at 1e-3 one epoch wrecks a converged model.
    #   0 = the paper's letter: L_tot steps the supervised Adam at its current rate.
    cssl_lr: float = 1e-4
    # the supervised (fine-tune) epochs' rate in the rounds, stage A's Adam continuing; 0 = the rate
    # stage A's plateau scheduler left (1e-5 after two cuts cannot move the model)
    finetune_lr: float = 1e-4
    round_warmup_steps: int = 0  # linear warm-up of the L_tot rate over its first steps (round 1 on)
    round_schedule: Literal["constant", "cosine"] = "constant"  # per-round decay of both rates
    # train.protocol joint: the rate over the budget, from optim.lr: "poly" lr (1 - t/T)^0.9 (SSL4MIS,
    # CPS) or "cosine" (to 0 at train.total_steps)
    joint_schedule: Literal["poly", "cosine"] = "poly"


@dataclass
class TrainConfig:
    seed: int = 0
    batch_size: int = 16  # supervised batch (paper: 16 at 320x256)
    # the schedule (cssl_ray.run.joint has the whole of "joint"):
    #   paper  stage A (train.stage_a_steps) on D_L, then train.max_rounds rounds of (pseudo-labels ->
    #          one L_tot epoch over D_U -> a fine-tune epoch on D_L); baselines take L_tot's steps
    #   joint  the semi-supervised segmentation literature's (SSL4MIS, CPS, UniMatch): train.total_steps
    #          steps from the initial weights, each on a labelled and an unlabelled batch, loss L_sup +
    #          w(t) L_unsup with w(t) a sigmoid ramp over train.rampup_steps, the rate decayed by
    #          optim.joint_schedule, no early stopping; validation (and CSSL's pseudo-label refresh, a
    #          "round") every train.pseudo_refresh_steps steps
    protocol: Literal["paper", "joint"] = "paper"
    total_steps: int = 2000  # joint: the whole budget in optimiser steps
    rampup_steps: int = 0  # joint: w(t)'s sigmoid ramp length in steps; 0 = the whole budget (SSL4MIS)
    pseudo_refresh_steps: int = 200  # joint: steps between validations and CSSL's pseudo-label refreshes
    # stage A's budget in optimiser steps on D_L, run in full (the paper trains the supervised model
    # to convergence): an "epoch" of stage A is sup_steps_per_epoch steps (0 = one pass over D_L), the
    # last one shortened so the steps add up; after each, a validation, and the rate is cut by
    # optim.plateau_factor on plateaus of optim.plateau_metric (the training loss). A config's budget is
    # measured: where supervised-only with every image labelled stops improving (docs/science.md)
    stage_a_steps: int = 2000
    # 0 (default): no early stopping; the rounds start from stage A's last weights. > 0: stage A stops
    # after this many epochs without a better select_metric and goes on from its best weights (on a
    # handful of validation images this stops an unconverged, uncalibrated model: docs/science.md)
    stage_a_patience: int = 0
    # the validation key the run keeps its best weights by (stage A's best epoch, the best round,
    # best.pt, the test): "val_" + a loop.evaluate key, i.e. one of VAL_METRICS or val_dice/<class>,
    # val_iou/<class>. Tune and ablate set it to the space's metric (search_space.Space.select)
    select_metric: str = "val_dice_mean"
    select_mode: Literal["auto", "max", "min"] = "auto"  # better = larger / smaller; auto = min for val_loss, else max
    max_rounds: int = 20  # CSSL rounds (pseudo-label -> L_tot epoch -> fine-tune epoch -> validate)
    # an L_tot epoch is one pass over D_U: ceil(|D_U| / consistency.batch_size) steps for every cell
    # with L_CL or L_CR; if > 0, this caps the steps of one round (CPU budgets)
    steps_per_round: int = 0
    sup_steps_per_epoch: int = 0  # supervised / fine-tune steps per epoch; 0 = one pass over D_L
    augment: bool = True  # paired flips / 90-degree rotations of labelled images and masks
    # the stop rule of the rounds, the same for every cell: "max_rounds" runs every round (the best
    # validation round is tested); "loss_plateau" (the paper's) stops when the round's training loss
    # (L_tot; the fine-tune loss for cells without L_tot) has not improved by plateau_delta for
    # plateau_rounds rounds - cells may then run different numbers of rounds
    stop: Literal["max_rounds", "loss_plateau"] = "max_rounds"
    plateau_rounds: int = 5
    plateau_delta: float = 1e-3
    # what the rounds train on D_U: "cssl" (L_CL / L_CR by use_cl, use_cr) or a baseline with the same
    # steps (cssl_ray.run.baseline_rounds: bn_mix, pseudo_label, mean_teacher, cps), or simclr_pretrain
    # (image-level contrastive pretraining before stage A, then the supervised schedule); a baseline
    # needs use_cl = use_cr = false
    method: Literal["cssl", "bn_mix", "pseudo_label", "mean_teacher", "cps", "simclr_pretrain"] = "cssl"
    use_cl: bool = True
    use_cr: bool = True
    # every L_tot step also takes a supervised batch of D_L (train.batch_size, augmented; its own random
    # stream) and adds its L_sup: L_tot = L_sup + w_cl L_CL + w_cr L_CR. Off = the paper's letter
    lsup_in_ltot: bool = False
    # BatchNorm running statistics during L_tot steps: "update" (default; what the paper's framework does
    # in training mode: the patches' and D_U's batches move them) or "frozen" (batch statistics normalise,
    # running ones stay). Measured (benchmarks/round_probe.py, docs/science.md): with "update" the rounds
    # raise validation Dice on synthetic and nuclei, with "frozen" they do not; much of the gain is the
    # statistics themselves (a control with L_CL's rate ~0 keeps two thirds of it), so compare with bn_mix
    ltot_bn: Literal["frozen", "update"] = "update"
    # passes over D_U per L_tot epoch (the round's budget; each pass reshuffled); capped by steps_per_round
    round_passes: int = 1
    use_hard_negatives: bool = True
    w_cl: float = 1.0
    w_cr: float = 1.0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # mixed precision of the forward passes (cssl_ray.models.precision): "off" = fp32; "bf16" = bfloat16
    # autocast (CPU or CUDA, no loss scaling); "fp16" = float16 autocast with a GradScaler, CUDA only.
    # Weights, optimiser state and losses stay fp32 in every mode
    amp: Literal["off", "bf16", "fp16"] = "off"
    # NHWC weights and input batches (what tensor-core convolutions want); fp32 results equal NCHW's
    # within rounding
    channels_last: bool = False
    # Ray runs with several workers: BatchNorm statistics over the whole global batch (torch's
    # SyncBatchNorm, CUDA only). Off, each rank normalises its share of a batch by its own statistics:
    # the one part of a step that depends on the worker count (cssl_ray.method.collectives)
    sync_bn: bool = False
    # torch intra-op CPU threads; 0 = torch's default (all cores). Small models on a shared 2-core
    # box run ~5x faster with 1 (measured: nuclei config 10.5 min at 2 threads vs 2.2 min at 1)
    num_threads: int = 0
    out_dir: str = "runs/local"  # checkpoints and the resolved config
    keep_checkpoints: int = 2  # round checkpoints kept on disk (best.pt is always kept)
    progress: bool = True
    # write the paper's figures (pseudo-labels over rounds, omega, embedding projection) as PNGs to
    # out_dir/figures/ at the end (cssl_ray.evaluation.figures); costs a forward of 2 images per round and, on smoke
    # sizes, ~0.2 s at the end (+0.5 s for importing matplotlib, once per process)
    figures: bool = True

    def last_round(self) -> int:
        """The number of the run's last round: max_rounds (paper), or ceil(total_steps /
        pseudo_refresh_steps) (joint: a round is a refresh period, ending in a validation)."""
        if self.protocol == "joint":
            return -(-self.total_steps // self.pseudo_refresh_steps)
        return self.max_rounds

    def selection(self) -> tuple[str, str]:
        """``(select_metric, "max" | "min")``: the selection with ``select_mode: auto`` resolved."""
        return self.select_metric, natural_mode(self.select_metric) if self.select_mode == "auto" else self.select_mode

    def selection_order(self) -> list[tuple[str, str]]:
        """What "better" compares, in order: the selection, then val_dice_mean (max) to break its ties.

        A tie-break, because a selection metric can be flat for a whole run: nuclei's
        val_dice/micronucleus is 0.0 at every epoch while the model learns nuclei, and a strict
        "ties keep the earlier" rule alone then hands the rounds (and the test) stage A's first,
        barely trained epoch (measured: test dice_mean 0.11 instead of 0.46)."""
        first = self.selection()
        return [first] if first[0] == "val_dice_mean" else [first, ("val_dice_mean", "max")]


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pseudo: PseudoConfig = field(default_factory=PseudoConfig)
    patches: PatchConfig = field(default_factory=PatchConfig)
    contrastive: ContrastiveConfig = field(default_factory=ContrastiveConfig)
    silhouette: SilhouetteConfig = field(default_factory=SilhouetteConfig)
    consistency: ConsistencyConfig = field(default_factory=ConsistencyConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    baselines: BaselinesConfig = field(default_factory=BaselinesConfig)


# ---------------------------------------------------------------------------------------------
# Overrides from plain dicts / YAML, with one-line errors.


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (tuples from lists)."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {', '.join(map(str, allowed))}")
        return value
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(f"{key}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {tp!r}")  # pragma: no cover - config author error


# keys that no longer exist, with what replaced them (an old YAML gets this line, not a bare "unknown key")
RENAMED = {
    "train.supervised_epochs": "train.stage_a_steps (stage A's budget in optimiser steps; epochs x "
                               "train.sup_steps_per_epoch), run in full without early stopping by default",
}


def apply_overrides(cfg: Any, overrides: dict[str, Any], prefix: str = "") -> Any:
    """Return a copy of dataclass ``cfg`` with nested ``overrides`` applied and type-checked."""
    if not isinstance(overrides, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping of keys, got {overrides!r}")
    hints = typing.get_type_hints(type(cfg))
    names = [f.name for f in dataclasses.fields(cfg)]
    changes: dict[str, Any] = {}
    for key, value in overrides.items():
        full = f"{prefix}{key}"
        if full in RENAMED:
            raise ConfigError(f"{full} was replaced by {RENAMED[full]}")
        if key not in names:
            raise ConfigError(f"unknown config key {full!r}; allowed here: {', '.join(names)}")
        current = getattr(cfg, key)
        if dataclasses.is_dataclass(current):
            changes[key] = apply_overrides(current, value, prefix=f"{full}.")
        else:
            changes[key] = _coerce(full, value, hints[key])
    return dataclasses.replace(cfg, **changes)


def _check(ok: bool, key: str, allowed: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{key}: {value!r} is out of range; allowed: {allowed}")


def validate(cfg: Config) -> Config:
    """Range checks across the tree; raises ``ConfigError`` naming the first bad key."""
    d, m, p, pt, c = cfg.data, cfg.model, cfg.pseudo, cfg.patches, cfg.contrastive
    _check(d.num_classes >= 2, "data.num_classes", ">= 2 (background + at least one class)", d.num_classes)
    _check(all(s >= 8 for s in d.image_size), "data.image_size", "both sides >= 8", d.image_size)
    _check(d.in_channels >= 1, "data.in_channels", ">= 1", d.in_channels)
    _check(d.n_train >= 2, "data.n_train", ">= 2", d.n_train)
    _check(d.n_val >= 1 and d.n_test >= 1, "data.n_val/n_test", ">= 1", (d.n_val, d.n_test))
    _check(0.0 < d.labelled_fraction <= 1.0, "data.labelled_fraction", "0 < fraction <= 1", d.labelled_fraction)
    if d.name == "synthetic":  # real datasets check labelled_count against their training pool
        _check(0 <= d.labelled_count <= d.n_train, "data.labelled_count", f"0..data.n_train ({d.n_train})", d.labelled_count)
    _check(d.labelled_count >= 0, "data.labelled_count", ">= 0", d.labelled_count)
    _check(d.difficulty >= 0, "data.difficulty", ">= 0", d.difficulty)
    _check(bool(d.name) and "/" not in d.name and not d.name.startswith("."), "data.name",
           "a dataset card name (python -m cssl_ray.data list)", d.name)
    _check(d.val_fraction == -1.0 or 0.0 <= d.val_fraction < 1.0, "data.val_fraction", "-1 (the card's) or 0 <= f < 1",
           d.val_fraction)
    _check(d.test_fraction == -1.0 or 0.0 <= d.test_fraction < 1.0, "data.test_fraction",
           "-1 (the card's) or 0 <= f < 1", d.test_fraction)
    _check(d.val_count >= 0 and (d.val_count == 0 or d.name != "synthetic"), "data.val_count",
           ">= 0, and 0 for synthetic (set data.n_val)", d.val_count)
    _check(max(d.val_fraction, 0.0) + max(d.test_fraction, 0.0) < 1.0, "data.val_fraction + data.test_fraction",
           "< 1", (d.val_fraction, d.test_fraction))
    _check(m.base_channels >= 1, "model.base_channels", ">= 1", m.base_channels)
    _check(1 <= m.depth <= 6, "model.depth", "1..6", m.depth)
    _check(m.embed_dim >= 2, "model.embed_dim", ">= 2", m.embed_dim)
    _check(m.proj_hidden >= 1, "model.proj_hidden", ">= 1", m.proj_hidden)
    _check(0.0 < p.threshold <= 1.0, "pseudo.threshold", "0 < threshold <= 1", p.threshold)
    _check(0.0 <= p.class_fraction <= 1.0, "pseudo.class_fraction", "0..1 (0 = the threshold alone)", p.class_fraction)
    _check(0.0 <= p.floor <= 1.0 and (p.class_fraction == 0 or p.floor <= p.threshold), "pseudo.floor",
           f"0..pseudo.threshold ({p.threshold}) with pseudo.class_fraction > 0", p.floor)
    _check(p.ignore_index < 0 or p.ignore_index >= d.num_classes, "pseudo.ignore_index",
           f"negative or >= data.num_classes ({d.num_classes})", p.ignore_index)
    _check(pt.size >= 1 and all(pt.size <= s for s in d.image_size), "patches.size",
           f"1..min(data.image_size) ({min(d.image_size)})", pt.size)
    _check(1 <= pt.min_pixels <= pt.size * pt.size, "patches.min_pixels", f"1..patches.size^2 ({pt.size ** 2})", pt.min_pixels)
    _check(pt.per_image >= 1, "patches.per_image", ">= 1", pt.per_image)
    _check(pt.batch_size >= 2, "patches.batch_size", ">= 2 (an anchor needs a positive)", pt.batch_size)
    _check(c.tau > 0, "contrastive.tau", "> 0", c.tau)
    _check(0.0 <= c.alpha_min, "contrastive.alpha_min", ">= 0", c.alpha_min)
    _check(c.alpha_max <= 0.5, "contrastive.alpha_max", "<= 0.5 (the anchor must weigh less than the negative)", c.alpha_max)
    _check(c.alpha_min < c.alpha_max, "contrastive.alpha_min", f"< contrastive.alpha_max ({c.alpha_max})", c.alpha_min)
    _check(c.hard_ratio > 0, "contrastive.hard_ratio", "> 0", c.hard_ratio)
    _check(c.aux_samples >= 0, "contrastive.aux_samples", ">= 0", c.aux_samples)
    _check(c.aux_sigma > 0, "contrastive.aux_sigma", "> 0", c.aux_sigma)
    _check(cfg.silhouette.max_samples >= 2, "silhouette.max_samples", ">= 2", cfg.silhouette.max_samples)
    _check(cfg.consistency.eps >= 0, "consistency.eps", ">= 0", cfg.consistency.eps)
    _check(0.0 <= cfg.consistency.ema_decay < 1.0, "consistency.ema_decay", "0 <= decay < 1", cfg.consistency.ema_decay)
    _check(cfg.consistency.batch_size >= 1, "consistency.batch_size", ">= 1", cfg.consistency.batch_size)
    o, t = cfg.optim, cfg.train
    _check(o.cssl_lr >= 0, "optim.cssl_lr", ">= 0 (0 = L_tot steps the supervised optimiser)", o.cssl_lr)
    _check(o.finetune_lr >= 0, "optim.finetune_lr", ">= 0 (0 = the rate stage A ended at)", o.finetune_lr)
    _check(o.round_warmup_steps >= 0, "optim.round_warmup_steps", ">= 0", o.round_warmup_steps)
    _check(t.stage_a_patience >= 0, "train.stage_a_patience", ">= 0 (0 = no early stopping)", t.stage_a_patience)
    check_metric("train.select_metric", t.select_metric, None)  # the class name: once the data is known
    _check(o.lr > 0, "optim.lr", "> 0", o.lr)
    _check(o.weight_decay >= 0, "optim.weight_decay", ">= 0", o.weight_decay)
    _check(0.0 < o.plateau_factor < 1.0, "optim.plateau_factor", "0 < factor < 1", o.plateau_factor)
    _check(o.plateau_patience >= 0, "optim.plateau_patience", ">= 0", o.plateau_patience)
    _check(t.batch_size >= 1, "train.batch_size", ">= 1", t.batch_size)
    _check(t.stage_a_steps >= 0, "train.stage_a_steps", ">= 0 (0 = no stage A)", t.stage_a_steps)
    _check(t.max_rounds >= 0, "train.max_rounds", ">= 0", t.max_rounds)
    _check(t.total_steps >= 1, "train.total_steps", ">= 1 (train.protocol joint's budget)", t.total_steps)
    _check(t.rampup_steps >= 0, "train.rampup_steps", ">= 0 (0 = the whole budget)", t.rampup_steps)
    _check(t.pseudo_refresh_steps >= 1, "train.pseudo_refresh_steps", ">= 1", t.pseudo_refresh_steps)
    _check(t.steps_per_round >= 0, "train.steps_per_round", ">= 0", t.steps_per_round)
    _check(t.round_passes >= 1, "train.round_passes", ">= 1", t.round_passes)
    _check(t.sup_steps_per_epoch >= 0, "train.sup_steps_per_epoch", ">= 0", t.sup_steps_per_epoch)
    _check(t.num_threads >= 0, "train.num_threads", ">= 0 (0 = torch's default)", t.num_threads)
    _check(t.keep_checkpoints >= 1, "train.keep_checkpoints", ">= 1", t.keep_checkpoints)
    _check(t.plateau_rounds >= 1, "train.plateau_rounds", ">= 1", t.plateau_rounds)
    _check(t.w_cl >= 0 and t.w_cr >= 0, "train.w_cl/w_cr", ">= 0", (t.w_cl, t.w_cr))
    _check(t.device == "auto" or t.device == "cpu" or t.device.startswith("cuda"), "train.device",
           "auto, cpu, cuda or cuda:N", t.device)
    _check(not (t.amp == "fp16" and t.device == "cpu"), "train.amp", "off or bf16 on train.device cpu "
           "(fp16 needs CUDA)", t.amp)
    _check(t.method == "cssl" or not (t.use_cl or t.use_cr), "train.method",
           "cssl with train.use_cl / use_cr; a baseline needs both false", t.method)
    b = cfg.baselines
    _check(b.pseudo_weight >= 0, "baselines.pseudo_weight", ">= 0", b.pseudo_weight)
    _check(0.0 <= b.mt_ema_decay < 1.0, "baselines.mt_ema_decay", "0 <= decay < 1", b.mt_ema_decay)
    _check(b.mt_weight >= 0, "baselines.mt_weight", ">= 0", b.mt_weight)
    _check(b.mt_rampup_rounds >= 0, "baselines.mt_rampup_rounds", ">= 0 (0 = all rounds)", b.mt_rampup_rounds)
    _check(b.mt_noise_std >= 0, "baselines.mt_noise_std", ">= 0", b.mt_noise_std)
    _check(b.cps_weight >= 0, "baselines.cps_weight", ">= 0", b.cps_weight)
    _check(b.simclr_epochs >= 1, "baselines.simclr_epochs", ">= 1", b.simclr_epochs)
    _check(b.simclr_batch_size >= 2, "baselines.simclr_batch_size", ">= 2 (a view needs negatives)",
           b.simclr_batch_size)
    _check(b.simclr_temperature > 0, "baselines.simclr_temperature", "> 0", b.simclr_temperature)
    _check(t.method != "cps" or o.cssl_lr > 0, "optim.cssl_lr", "> 0 with train.method cps (one Adam steps both "
           "networks in the unlabelled epoch)", o.cssl_lr)
    return cfg


def from_dict(overrides: dict[str, Any] | None = None) -> Config:
    """Defaults, then ``overrides`` (nested dict), then range checks."""
    return validate(apply_overrides(Config(), overrides or {}))


def load_config(path: str | Path, extra: dict[str, Any] | None = None) -> Config:
    """Read a YAML file of overrides; errors name the file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config ({e.strerror})") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0] if str(e) else "invalid YAML"
        raise ConfigError(f"{path}: not valid YAML ({first})") from None
    try:
        cfg = apply_overrides(Config(), data)
        if extra:
            cfg = apply_overrides(cfg, extra)
        return validate(cfg)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested dict (tuples as lists) for YAML, Ray and MLflow."""
    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return plain(dataclasses.asdict(cfg))


def dump_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def parse_override(text: str) -> dict[str, Any]:
    """``"contrastive.tau=0.2"`` -> ``{"contrastive": {"tau": 0.2}}`` (value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key.path=value")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw)
    if isinstance(value, str):  # YAML 1.1 reads 1e-5 (no dot) as a string; a number is meant
        try:
            value = float(value) if value.strip().lower() not in ("nan", "inf", "-inf", "infinity") else value
        except ValueError:
            pass
    out: dict[str, Any] = {}
    node = out
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge nested dicts (b wins)."""
    out = dict(a)
    for k, v in b.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
