"""In-memory splits for the single-process trainer: D_L, D_U, val and test as tensors.

``synthetic`` is generated in memory (``make_synthetic``) and cut by ``make_split``. Every other
dataset is prepared once into the Parquet store (``prepare.prepare``: read, normalised per its card,
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
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from cssl_ray.config import ConfigError, DataConfig
from cssl_ray.data.cards import CardError, DatasetCard, load_card
from cssl_ray.data.sample import DatasetError
from cssl_ray.data.splits import Split, SplitReport, make_split, split_dataset
from cssl_ray.data.synthetic import class_names, synthetic_images


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


PARTS = ("labelled", "unlabelled", "val", "test")


@dataclass(frozen=True)
class DataSource:
    """A split without its pixels: where the images are and which rows each part holds. Small and
    picklable: a Ray run sends it (not the arrays) to every worker and stream task, which read just
    the rows they need (``take``), from the prepared Parquet store (a path every node sees, or an
    ``s3://`` / ``gs://`` / ``file://`` cache) or, for ``synthetic``, by generating exactly those
    images (each is seeded by its index, so any process makes the same image). A process keeps the
    rows it read (``ROW_CACHE_BYTES``), so a stream task reads an image once, not every round."""

    data: DataConfig
    store: str | None  # the prepared store's path or URI; None = synthetic
    split: Split
    class_names: list[str]
    names: list[str] = field(default_factory=list)  # row names the split's indices refer to (store order)
    report: SplitReport | None = None
    hidden_known: bool = True  # every D_U image has a mask (the pseudo-label accuracy diagnostic)

    def count(self, part: str) -> int:
        return len(self._rows(part))

    def describe(self) -> str:
        """``3 labelled, 27 unlabelled, 3 val, 15 test images``."""
        return ", ".join(f"{self.count(p)} {p}" for p in PARTS) + " images"

    def take(self, part: str, positions: Sequence[int] | Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Images (N, C, H, W) float32 and masks (N, H, W) int64 of ``part`` at ``positions`` (all if
        None), or masks None when some image has none (D_U of a folder dataset)."""
        rows = self._rows(part)
        pos = range(len(rows)) if positions is None else [int(p) for p in positions]
        idx = [rows[p] for p in pos]
        c, (h, w) = self.data.in_channels, self.data.image_size
        if not idx:
            return torch.zeros((0, c, h, w)), torch.zeros((0, h, w), dtype=torch.int64)
        cached = _ROWS.get(self, idx)
        x = torch.from_numpy(np.stack([r[0] for r in cached]))  # (N, C, H, W)
        if any(r[1] is None for r in cached):
            return x, None
        return x, torch.from_numpy(np.stack([r[1] for r in cached]).astype(np.int64))  # (N, H, W)

    def read_rows(self, idx: list[int]) -> list[tuple[np.ndarray, np.ndarray | None]]:
        """(image, mask or None) of dataset rows ``idx``: read from the store, or generated."""
        if self.store is None:
            d = self.data
            x, y = synthetic_images(idx, d.image_size, d.num_classes, seed=d.seed, difficulty=d.difficulty,
                                    in_channels=d.in_channels)
            images = x.numpy()
            if d.normalise == "percentile":  # per image, as the real datasets' readers (the card's method: none)
                from cssl_ray.data.preprocess import Preprocessing, percentile_normalise
                p = Preprocessing()
                images = np.stack([percentile_normalise(image, p.low, p.high) for image in images])
            return list(zip(images, y.numpy()))
        images, masks = _open_store(self).arrays(idx)
        return list(zip(images, masks))

    def bundle(self, *, labelled: bool = True, unlabelled: int | None = None) -> DataBundle:
        """The split's arrays: D_L unless ``labelled`` is False, the first ``unlabelled`` D_U images
        (all if None); val and test always."""
        lx, ly = self.take("labelled", None if labelled else [])
        n_u = self.count("unlabelled") if unlabelled is None else min(unlabelled, self.count("unlabelled"))
        ux, uy = self.take("unlabelled", range(n_u))
        vx, vy = self.take("val")
        tx, ty = self.take("test")
        if ly is None or vy is None or ty is None:
            raise ConfigError(f"data ({self.data.name}): a labelled, val or test image has no mask")
        return DataBundle(lx, ly, ux, uy if self.hidden_known else None, vx, vy, tx, ty, list(self.class_names),
                          self.split, names=list(self.names), report=self.report)

    def _rows(self, part: str) -> list[int]:
        if part not in PARTS:
            raise ValueError(f"part must be one of {', '.join(PARTS)}, got {part!r}")
        return getattr(self.split, part)


class _RowCache:
    """Decoded rows, kept per process up to ``budget`` bytes (least recently used out): a Ray stream
    task reads a D_U image from the store (or generates it) once, not once per round."""

    def __init__(self, budget: int) -> None:
        self.budget, self.used = budget, 0
        self.rows: OrderedDict[tuple[Any, int], tuple[np.ndarray, np.ndarray | None]] = OrderedDict()

    def get(self, source: DataSource, idx: list[int]) -> list[tuple[np.ndarray, np.ndarray | None]]:
        d = source.data
        where = (source.store, d.name, tuple(d.image_size), d.in_channels, d.num_classes, d.seed, d.difficulty,
                 d.normalise)
        missing = sorted({i for i in idx if (where, i) not in self.rows})
        for i, row in zip(missing, source.read_rows(missing) if missing else []):
            self.rows[(where, i)] = row
            self.used += _nbytes(row)
        out = []
        for i in idx:
            self.rows.move_to_end((where, i))
            out.append(self.rows[(where, i)])
        while self.used > self.budget and len(self.rows) > len(idx):
            self.used -= _nbytes(self.rows.popitem(last=False)[1])
        return out


def _nbytes(row: tuple[np.ndarray, np.ndarray | None]) -> int:
    return row[0].nbytes + (row[1].nbytes if row[1] is not None else 0)


ROW_CACHE_BYTES = 256 * 2**20  # per process
_ROWS = _RowCache(ROW_CACHE_BYTES)
_STORES: dict[str, Any] = {}  # location -> open Store: one per process (Ray workers and stream tasks reuse it)


def _open_store(source: DataSource) -> Any:
    """The open ``Store`` of ``source`` in this process. A node that cannot read the driver's file (a
    per-node cache) prepares the dataset here from the same settings (nuclei fetches itself; other
    datasets need their files on this node) and checks that it holds the same rows and split."""
    location = str(source.store)
    if location in _STORES:
        return _STORES[location]
    from cssl_ray.data.store import Store, is_uri
    fix = ("set data.cache_dir to a folder every node reads, or an s3:// / gs:// / file:// cache "
           "(cluster/README.md)")
    try:
        store = Store(location)
    except DatasetError as e:
        if is_uri(location):
            raise ConfigError(f"{e}; {fix}") from None
        try:
            here = open_source(source.data)
        except ConfigError as again:
            raise ConfigError(f"{e}, and preparing it on this node failed ({again}); {fix}") from None
        if here.names != source.names or here.split != source.split:
            raise ConfigError(f"{here.store}: the dataset prepared on this node differs from the driver's {location} "
                              f"(other files or split); {fix}")
        store = Store(str(here.store))
    _STORES[location] = store
    return store


def load_bundle(cfg: DataConfig) -> DataBundle:
    """Build the dataset named by ``cfg.name`` and cut it by the seeded split (every part's arrays)."""
    return open_source(cfg).bundle()


def open_source(cfg: DataConfig) -> DataSource:
    """The seeded split of the dataset named by ``cfg.name``, its pixels left where they are (a real
    dataset is prepared into the store first, if it is not cached)."""
    if cfg.name == "synthetic":
        split = make_split(cfg.n_train, cfg.n_val, cfg.n_test, cfg.labelled_fraction, cfg.labelled_count,
                           seed=cfg.seed)
        return DataSource(cfg, None, split, class_names(cfg.num_classes))
    card = check_dataset(cfg)
    from cssl_ray.data.prepare import prepare  # pyarrow and the readers load only for real datasets
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
            seed=cfg.seed, digests=index["digest"], val_count=cfg.val_count)
    except ValueError as e:
        raise ConfigError(f"data ({card.name}): {e}") from None
    if report.duplicates_dropped:
        names = ", ".join(index["name"][i] for i in report.duplicates_dropped)
        warnings.warn(f"{card.name}: dropped {len(report.duplicates_dropped)} val/test image(s) whose pixels repeat a "
                      f"training image: {names}", stacklevel=2)
    if not split.val or not split.test:
        raise ConfigError(f"data ({card.name}): the split has {len(split.val)} val and {len(split.test)} test images; "
                          f"both need >= 1 (set data.val_fraction / data.test_fraction)")
    return DataSource(cfg, str(store.path), split, store.classes, names=list(index["name"]), report=report,
                      hidden_known=all(index["has_mask"][i] for i in split.unlabelled))


def check_dataset(cfg: DataConfig) -> DatasetCard | None:
    """Cheap checks a driver runs before starting anything (Ray, a model): the card exists, its
    classes and channels match the config, and its files are on disk (nuclei downloads itself) unless
    ``data.cache_dir`` is a URI (``cache.remote_cache``: the prepared store is read from there).
    Returns the card (None for synthetic); ConfigError, one line, otherwise."""
    if cfg.name == "synthetic":
        return None
    try:
        card = load_card(cfg.name)
    except CardError as e:
        raise ConfigError(f"data.name: {e}") from None
    check_card(cfg, card)
    from cssl_ray.data.cache import remote_cache
    from cssl_ray.data.sources import WHEEL_FORMATS, default_root, missing_message
    try:
        remote = remote_cache(cfg.cache_dir or None)
    except DatasetError as e:
        raise ConfigError(f"data.cache_dir: {e}") from None
    if card.format not in (*WHEEL_FORMATS, "synthetic") and not remote:  # a remote cache needs no raw files
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
