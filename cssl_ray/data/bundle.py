"""In-memory splits for the single-process trainer: D_L, D_U, val and test as tensors.

``synthetic`` is generated in memory (``make_synthetic``) and cut by ``make_split``. Every other
dataset is prepared once into the Parquet store (``store.prepare``: read, normalised per its card,
resized to ``data.image_size``, cached), then cut by ``split_dataset``: the distribution's fixed
subsets, groups (patients) kept whole, a seeded labelled fraction or count.

The masks of D_U are kept only as ``unlabelled_masks_hidden`` for diagnostics (pseudo-label
accuracy per round); the training code never reads them. It is ``None`` when some D_U images have
no mask at all (a ``folder`` dataset's ``unlabelled/``): the diagnostic is then skipped.

``data.num_classes`` and ``data.in_channels`` are checked against the dataset, not derived from
it: the resolved config logged with a run must say what the network really was, so a mismatch is a
``ConfigError`` naming the key and the dataset's value. Data errors (a missing download, a bad
file) become ``ConfigError`` too, one line, so every entry point reports them the same way.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from cssl_ray.config import ConfigError, DataConfig
from cssl_ray.data.cards import CardError, DatasetCard, load_card
from cssl_ray.data.sample import DatasetError
from cssl_ray.data.splits import Split, SplitReport, make_split, split_dataset
from cssl_ray.data.synthetic import class_names, make_synthetic


@dataclass
class DataBundle:
    labelled_images: Tensor  # (L, C_in, H, W)
    labelled_masks: Tensor  # (L, H, W) int64
    unlabelled_images: Tensor  # (U, C_in, H, W)
    unlabelled_masks_hidden: Tensor | None  # (U, H, W): diagnostics only, never trained on; None = unknown
    val_images: Tensor
    val_masks: Tensor
    test_images: Tensor
    test_masks: Tensor
    class_names: list[str]
    split: Split
    names: list[str] = field(default_factory=list)  # row names the split's indices refer to (store order)
    report: SplitReport | None = None  # real datasets: what the split carved, dropped, excluded


def load_bundle(cfg: DataConfig) -> DataBundle:
    """Build the dataset named by ``cfg.name`` and cut it by the seeded split."""
    if cfg.name == "synthetic":
        return _synthetic_bundle(cfg)
    card = check_dataset(cfg)
    from cssl_ray.data.store import prepare  # pyarrow and the readers load only for real datasets
    try:
        store = prepare(card, cfg.root or None, size=tuple(cfg.image_size), channels=cfg.in_channels,
                        normalise=cfg.normalise, cache=cfg.cache_dir or None)
    except DatasetError as e:
        raise ConfigError(str(e)) from None
    if len(store.classes) != cfg.num_classes:
        raise ConfigError(f"data.num_classes: {cfg.num_classes} does not match dataset {card.name!r}, which has "
                          f"{len(store.classes)} classes ({', '.join(store.classes)}); set data.num_classes: "
                          f"{len(store.classes)}")
    index = store.index()
    rule = card.splits
    try:
        split, report = split_dataset(
            index["subset"], index["group"], index["has_mask"],
            labelled_fraction=cfg.labelled_fraction, labelled_count=cfg.labelled_count,
            val_fraction=rule.val_fraction if cfg.val_fraction < 0 else cfg.val_fraction,
            test_fraction=rule.test_fraction if cfg.test_fraction < 0 else cfg.test_fraction,
            labelled_by=rule.labelled_by if cfg.labelled_by == "auto" else cfg.labelled_by,
            seed=cfg.seed, digests=index["digest"])
    except ValueError as e:
        raise ConfigError(f"data ({card.name}): {e}") from None
    if report.duplicates_dropped:
        names = ", ".join(index["name"][i] for i in report.duplicates_dropped)
        warnings.warn(f"{card.name}: dropped {len(report.duplicates_dropped)} val/test image(s) whose pixels repeat a "
                      f"training image: {names}", stacklevel=2)
    if not split.val or not split.test:
        raise ConfigError(f"data ({card.name}): the split has {len(split.val)} val and {len(split.test)} test images; "
                          f"both need >= 1 (set data.val_fraction / data.test_fraction)")

    needed = sorted({*split.labelled, *split.unlabelled, *split.val, *split.test})
    read_images, read_masks = store.arrays(needed)  # only the row groups that hold them
    images = dict(zip(needed, read_images))
    masks = dict(zip(needed, read_masks))

    def stack_images(idx: list[int]) -> Tensor:
        c, (h, w) = cfg.in_channels, cfg.image_size
        if not idx:
            return torch.zeros((0, c, h, w), dtype=torch.float32)
        return torch.from_numpy(np.stack([images[i] for i in idx]))  # (N, C, H, W)

    def stack_masks(idx: list[int]) -> Tensor:
        if not idx:
            return torch.zeros((0, *cfg.image_size), dtype=torch.int64)
        return torch.from_numpy(np.stack([masks[i] for i in idx]).astype(np.int64))  # (N, H, W)

    hidden = stack_masks(split.unlabelled) if all(masks[i] is not None for i in split.unlabelled) else None
    return DataBundle(
        stack_images(split.labelled), stack_masks(split.labelled),
        stack_images(split.unlabelled), hidden,
        stack_images(split.val), stack_masks(split.val),
        stack_images(split.test), stack_masks(split.test),
        store.classes, split, names=list(index["name"]), report=report)


def check_dataset(cfg: DataConfig) -> DatasetCard | None:
    """Cheap checks a driver runs before starting anything (Ray, a model): the card exists, its
    classes and channels match the config, and its files are on disk (nuclei downloads itself) unless
    ``data.cache_dir`` is a URI (``store.remote_cache``: the prepared store is read from there).
    Returns the card (None for synthetic); ConfigError, one line, otherwise."""
    if cfg.name == "synthetic":
        return None
    try:
        card = load_card(cfg.name)
    except CardError as e:
        raise ConfigError(f"data.name: {e}") from None
    check_card(cfg, card)
    from cssl_ray.data.store import default_root, missing_message, remote_cache
    try:
        remote = remote_cache(cfg.cache_dir or None)
    except DatasetError as e:
        raise ConfigError(f"data.cache_dir: {e}") from None
    if card.format not in ("nuclei", "synthetic") and not remote:  # a remote cache needs no raw files
        root = Path(cfg.root).expanduser().resolve() if cfg.root else default_root(card.name)
        if not root.exists():
            raise ConfigError(missing_message(card, root))
    return card


def check_card(cfg: DataConfig, card: DatasetCard) -> None:
    """``data.num_classes`` / ``data.in_channels`` against what the card fixes (ConfigError naming both)."""
    if card.num_classes is not None and card.num_classes != cfg.num_classes:
        raise ConfigError(f"data.num_classes: {cfg.num_classes} does not match dataset {card.name!r}, which has "
                          f"{card.num_classes} classes ({', '.join(card.classes or ())}); set data.num_classes: "
                          f"{card.num_classes}")
    if card.channels is not None and card.channels != cfg.in_channels:
        raise ConfigError(f"data.in_channels: {cfg.in_channels} does not match dataset {card.name!r}, which has "
                          f"{card.channels} channel(s); set data.in_channels: {card.channels}")


def _synthetic_bundle(cfg: DataConfig) -> DataBundle:
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
