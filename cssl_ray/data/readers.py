"""Where the store finds a dataset's reader: the paper's formats come from ``cssl_ray.data.formats``;
``nuclei``, ``nuclei_tiles`` and ``synthetic`` are looked up here (they are not on-disk formats a user lays out)."""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cssl_ray.data.sample import DatasetError, Sample


@dataclass
class Reader:
    """What the store needs from a format: ``read(root, report=..., **options)`` and class names."""

    read: Callable[..., Iterator[Sample]]
    classes: Callable[[Path | None, dict[str, Any]], list[str]]
    needs_root: bool = True


def resolve_reader(fmt: str) -> Reader:
    """The reader of format ``fmt``; DatasetError naming the known formats."""
    if fmt == "nuclei":
        from cssl_ray.data import nuclei
        return Reader(nuclei.read, lambda root, options: list(nuclei.CLASSES))
    if fmt == "nuclei_tiles":
        from cssl_ray.data import nuclei_tiles
        return Reader(nuclei_tiles.read, lambda root, options: list(nuclei_tiles.CLASSES))
    if fmt == "synthetic":
        return Reader(read_synthetic, lambda root, options: _synthetic_classes(options), needs_root=False)
    try:
        from cssl_ray.data import formats
    except ImportError as e:  # a format module missing from this install
        raise DatasetError(f"format {fmt!r}: the readers in cssl_ray.data.formats cannot be imported ({e})") from None
    read = formats.get_reader(fmt)
    return Reader(read, lambda root, options: formats.class_names(fmt, root, **options))


def read_synthetic(root: Path | None = None, report: Any = None, *, n_train: int = 40, n_val: int = 8,
                   n_test: int = 16, size: Sequence[int] = (128, 128), num_classes: int = 4, seed: int = 0,
                   difficulty: float = 1.0) -> Iterator[Sample]:
    """The ``synthetic`` set as Samples: n_train train, then n_val val, then n_test test images."""
    from cssl_ray.data.synthetic import make_synthetic
    n = n_train + n_val + n_test
    images, masks = make_synthetic(n, tuple(size), num_classes, seed=seed, difficulty=difficulty)
    for i in range(n):
        subset = "train" if i < n_train else "val" if i < n_train + n_val else "test"
        yield Sample(name=f"{i:05d}", image=images[i, 0].numpy(), mask=masks[i].numpy().astype(np.uint8),
                     subset=subset, source=f"synthetic[{i}]")


def _synthetic_classes(options: dict[str, Any]) -> list[str]:
    from cssl_ray.data.synthetic import class_names
    return class_names(int(options.get("num_classes", 4)))
