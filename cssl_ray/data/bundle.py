"""In-memory splits for the single-process trainer: D_L, D_U, val and test as tensors.

The masks of D_U are kept only as ``unlabelled_masks_hidden`` for diagnostics (pseudo-label
accuracy per round); the training code never reads them.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from cssl_ray.config import ConfigError, DataConfig
from cssl_ray.data.splits import Split, make_split
from cssl_ray.data.synthetic import class_names, make_synthetic

DATASETS = ("synthetic",)


@dataclass
class DataBundle:
    labelled_images: Tensor  # (L, C_in, H, W)
    labelled_masks: Tensor  # (L, H, W) int64
    unlabelled_images: Tensor  # (U, C_in, H, W)
    unlabelled_masks_hidden: Tensor  # (U, H, W): diagnostics only, never trained on
    val_images: Tensor
    val_masks: Tensor
    test_images: Tensor
    test_masks: Tensor
    class_names: list[str]
    split: Split


def load_bundle(cfg: DataConfig) -> DataBundle:
    """Build the dataset named by ``cfg.name`` and cut it by the seeded split."""
    if cfg.name not in DATASETS:
        raise ConfigError(f"data.name: {cfg.name!r} is unknown; choose one of {', '.join(DATASETS)}")
    n = cfg.n_train + cfg.n_val + cfg.n_test
    images, masks = make_synthetic(n, cfg.image_size, cfg.num_classes, seed=cfg.seed,
                                   difficulty=cfg.difficulty, in_channels=cfg.in_channels)
    split = make_split(cfg.n_train, cfg.n_val, cfg.n_test, cfg.labelled_fraction,
                       cfg.labelled_count, seed=cfg.seed)

    def take(idx: list[int]) -> tuple[Tensor, Tensor]:
        return images[idx], masks[idx]

    lx, ly = take(split.labelled)
    ux, uy = take(split.unlabelled)
    vx, vy = take(split.val)
    tx, ty = take(split.test)
    return DataBundle(lx, ly, ux, uy, vx, vy, tx, ty, class_names(cfg.num_classes), split)
