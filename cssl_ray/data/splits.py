"""Seeded dataset splits: labelled D_L, unlabelled D_U, validation and test image indices.

Indices ``0 .. n_train-1`` are the training images. They are shuffled with the seed; the first
``|D_L|`` of that order are labelled and the rest unlabelled. Validation and test are the fixed
blocks that follow: ``n_train .. n_train+n_val-1`` and the next ``n_test``. Because D_L is a
prefix of one seeded order, a smaller labelled set is a subset of a larger one with the same seed
(20% labelled contains the 10% images), which keeps label-fraction ablations comparable.

A split is saved with every run (``write_split`` / ``read_split``, JSON) so the run can be
reproduced even if the splitting rule changes.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

_KEYS = ("labelled", "unlabelled", "val", "test")


@dataclass
class Split:
    """Image indices of each part; every list is sorted and the four are disjoint."""

    labelled: list[int] = field(default_factory=list)  # D_L: images used with their masks
    unlabelled: list[int] = field(default_factory=list)  # D_U: images whose masks are never read
    val: list[int] = field(default_factory=list)
    test: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, list[int]]:
        """Plain dict of lists of ints (JSON / YAML / MLflow ready)."""
        return {k: [int(i) for i in v] for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Split:
        """Inverse of ``to_dict``; ValueError on unknown or missing keys, non-integer or negative
        indices, and parts that overlap."""
        if not isinstance(data, dict):
            raise ValueError(f"split: expected a mapping with keys {', '.join(_KEYS)}, got {type(data).__name__}")
        unknown = sorted(set(data) - set(_KEYS))
        missing = [k for k in _KEYS if k not in data]
        if unknown or missing:
            raise ValueError(f"split: unknown keys {unknown} / missing keys {missing}; expected {', '.join(_KEYS)}")
        parts: dict[str, list[int]] = {}
        for k in _KEYS:
            v = data[k]
            if not isinstance(v, (list, tuple)) or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in v):
                raise ValueError(f"split.{k}: expected a list of non-negative integers, got {v!r}")
            parts[k] = sorted(int(i) for i in v)
        seen: dict[int, str] = {}
        for k in _KEYS:
            for i in parts[k]:
                if i in seen:
                    raise ValueError(f"split: index {i} is in both {seen[i]!r} and {k!r}")
                seen[i] = k
        return cls(**parts)


def labelled_size(n_train: int, labelled_fraction: float, labelled_count: int = 0) -> int:
    """|D_L|: ``labelled_count`` if > 0, else ``max(1, round(labelled_fraction * n_train))``,
    rounding halves up (0.5 -> 1, 2.5 -> 3; Python's ``round`` would give 0 and 2)."""
    if labelled_count > 0:
        return labelled_count
    return max(1, int(math.floor(labelled_fraction * n_train + 0.5)))


def make_split(
    n_train: int,
    n_val: int,
    n_test: int,
    labelled_fraction: float,
    labelled_count: int = 0,
    seed: int = 0,
) -> Split:
    """Split ``n_train + n_val + n_test`` images (see the module docstring).

    Args:
        n_train: training images, >= 1.
        n_val, n_test: >= 0.
        labelled_fraction: share of training images in D_L, in (0, 1]; 1.0 leaves D_U empty.
        labelled_count: if > 0, |D_L| exactly (overrides the fraction); at most ``n_train``.
        seed: seed of the shuffle of the training indices.

    Raises:
        ValueError naming the argument when a count is negative or the combination is impossible.
    """
    for name, value, low in (("n_train", n_train, 1), ("n_val", n_val, 0), ("n_test", n_test, 0), ("labelled_count", labelled_count, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if not 0.0 < labelled_fraction <= 1.0:  # also rejects NaN
        raise ValueError(f"labelled_fraction must be in (0, 1], got {labelled_fraction!r}")
    if labelled_count > n_train:
        raise ValueError(f"labelled_count ({labelled_count}) exceeds n_train ({n_train})")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    n_labelled = labelled_size(n_train, labelled_fraction, labelled_count)
    order = np.random.default_rng(seed).permutation(n_train)
    return Split(
        labelled=sorted(int(i) for i in order[:n_labelled]),
        unlabelled=sorted(int(i) for i in order[n_labelled:]),
        val=list(range(n_train, n_train + n_val)),
        test=list(range(n_train + n_val, n_train + n_val + n_test)),
    )


def write_split(split: Split, path: str | Path) -> None:
    """Write ``split`` as JSON (keys labelled, unlabelled, val, test)."""
    Path(path).write_text(json.dumps(split.to_dict(), indent=1) + "\n")


def read_split(path: str | Path) -> Split:
    """Read a split written by ``write_split``; errors name the file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise ValueError(f"{path}: cannot read split ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    try:
        return Split.from_dict(data)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
