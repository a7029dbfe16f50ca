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

from dataclasses import dataclass, field
from typing import Any, Literal


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
    name: str = "synthetic"  # a dataset card in datasets/ (synthetic, nuclei, nuclei_tiles, monuseg, chaos, jsrt, idrid, folder)
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
    # auto = the card's method; synthetic: auto / none (as generated) or percentile (each image's 1st-99.8th
    # percentiles to [0, 1], as the real readers; its images differ in brightness: docs/science.md 0.5)
    normalise: Literal["auto", "percentile", "scale", "jsrt12", "none"] = "auto"
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
    # (windows.dense_windows): every image gives its full budget, so a step's pool is about
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
    # simclr_pretrain: the images NT-Xent sees. "all" = D_L + D_U (the baseline); "labelled" = D_L only, as
    # many batches per epoch as a pass over D_L + D_U (the simclr_dl cell: does D_U matter, or the pretraining?)
    simclr_images: Literal["all", "labelled"] = "all"
    # bn_mix, mean_teacher, pseudo_label, cps: how the student (and CPS's B) sees a step's labelled and
    # unlabelled images. "mixed" (SSL4MIS's recipes, CPS): one forward of both, one BatchNorm batch;
    # "separate": two forwards, each half normalised by its own batch statistics (the running statistics
    # see both, as in CSSL's L_tot, whose labelled, patch and unlabelled batches are separate forwards)
    bn_batch: Literal["mixed", "separate"] = "mixed"


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
    # L_sup on labelled pixels, the same in every cell and step (stage A, fine-tune epochs, joint steps,
    # the baselines' labelled halves, both of CPS's networks, train.lsup_in_ltot): "ce" (the paper's
    # cross-entropy) or "ce_dice" (SSL4MIS's 0.5 (CE + soft Dice): a rare, small class weighs 1/C of the
    # Dice term, so it is learned where plain CE leaves it at background; cssl_ray.method.supervised)
    sup_loss: Literal["ce", "ce_dice"] = "ce"
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
    # Ray runs with several workers: how gradients are averaged. "explicit": one all-reduce of all of them,
    # flattened, after each backward (cssl_ray.method.collectives); "ddp": torch DistributedDataParallel
    # around a step module (distributed.collectives.DDPCollectives): bucketed all-reduces overlapped with
    # the backward, for the paper protocol's supervised and L_tot steps (other steps: explicit)
    grad_sync: Literal["explicit", "ddp"] = "explicit"
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
