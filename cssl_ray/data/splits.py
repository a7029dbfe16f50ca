"""Seeded dataset splits: labelled D_L, unlabelled D_U, validation and test image indices.

Indices ``0 .. n_train-1`` are the training images. They are shuffled with the seed; the first
``|D_L|`` of that order are labelled and the rest unlabelled. Validation and test are the fixed
blocks that follow: ``n_train .. n_train+n_val-1`` and the next ``n_test``. Because D_L is a
prefix of one seeded order, a smaller labelled set is a subset of a larger one with the same seed
(20% labelled contains the 10% images), which keeps label-fraction ablations comparable.

``make_split`` cuts the generated ``synthetic`` set as above. ``split_dataset`` cuts a prepared real
dataset: the distribution's fixed val / test where it has them, otherwise whole groups (patients,
cases) carved out by a seeded fraction, and D_L drawn the same prefix way over the remaining
training images (or whole groups).

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


# ---------------------------------------------------------------------------------------------
# Real datasets: fixed subsets where the distribution defines them, groups kept whole.


@dataclass
class SplitReport:
    """What ``split_dataset`` did besides the four lists, for logs and the run's summary."""

    carved_val_groups: list[str] = field(default_factory=list)  # groups moved from train to val
    carved_test_groups: list[str] = field(default_factory=list)
    duplicates_dropped: list[int] = field(default_factory=list)  # val/test rows that repeat a train image
    excluded: list[int] = field(default_factory=list)  # rows in no part (held-out rows without masks, ...)
    labelled_units: int = 0  # images or groups D_L was drawn from


def split_dataset(
    subsets: list[str | None],
    groups: list[str],
    has_mask: list[bool],
    *,
    labelled_fraction: float,
    labelled_count: int = 0,
    val_fraction: float = 0.0,
    test_fraction: float = 0.0,
    labelled_by: str = "image",
    seed: int = 0,
    digests: list[str] | None = None,
    val_count: int = 0,
) -> tuple[Split, SplitReport]:
    """Split the rows of a prepared dataset into D_L, D_U, val and test.

    1. Fixed subsets win: rows the distribution marks ``val`` / ``test`` (with masks) stay there;
       ``train`` and unmarked rows form the training pool. Held-out rows without masks (e.g. the
       CHAOS test patients) can be neither evaluated nor trained on: they are excluded.
    2. If no row is a fixed val (test) row, ``val_fraction`` (``test_fraction``) of the training
       pool's *groups* (patients, cases) move there whole, drawn with the seed: a group never spans
       training and evaluation. At least one group moves when the fraction is > 0 and two groups
       are left for training. Rows of a moved group without masks are excluded.
    3. With ``digests``, val and test rows whose raw pixels equal a training-pool row are dropped
       (the same image shipped twice would leak it).
    3b. ``val_count`` > 0: while val holds fewer images, whole training-pool groups with masks move
       to val in a seeded order (their own stream): a larger validation split than the
       distribution's, for datasets whose fixed val is a handful of images. Two groups stay for
       training at least.
    4. D_L: ``labelled_size(units, labelled_fraction, labelled_count)`` units of the training rows
       with masks, units being images or whole groups (``labelled_by``), a prefix of one seeded
       order (so 20% labelled contains the 10% set); every other training-pool row is D_U.

    Indices refer to the row order given; the draws in 2 and 4 use independent streams of
    ``seed``, so the val/test carve does not change with the labelled fraction.

    Raises:
        ValueError naming the argument when lengths differ, a fraction is out of range, or the
        training pool has fewer labelled units than ``labelled_count``.
    """
    n = len(subsets)
    if len(groups) != n or len(has_mask) != n or (digests is not None and len(digests) != n):
        raise ValueError(f"subsets, groups, has_mask (and digests) must have one entry per row; got "
                         f"{n}, {len(groups)}, {len(has_mask)}{'' if digests is None else f', {len(digests)}'}")
    if not 0.0 < labelled_fraction <= 1.0:
        raise ValueError(f"labelled_fraction must be in (0, 1], got {labelled_fraction!r}")
    if labelled_count < 0:
        raise ValueError(f"labelled_count must be >= 0, got {labelled_count}")
    if not (0.0 <= val_fraction < 1.0 and 0.0 <= test_fraction < 1.0 and val_fraction + test_fraction < 1.0):
        raise ValueError(f"val_fraction and test_fraction must be in [0, 1) with a sum < 1, got "
                         f"{val_fraction}, {test_fraction}")
    if labelled_by not in ("image", "group"):
        raise ValueError(f"labelled_by must be 'image' or 'group', got {labelled_by!r}")
    bad = sorted({s for s in subsets if s not in (None, "train", "val", "test")}, key=str)
    if bad:
        raise ValueError(f"subsets: unknown names {bad}; allowed train, val, test or None")

    report = SplitReport()
    part: list[str | None] = [None] * n  # "train" | "val" | "test" | None (excluded)
    for i, s in enumerate(subsets):
        if s in ("val", "test"):
            part[i] = s if has_mask[i] else None
        else:
            part[i] = "train"
    report.excluded = [i for i in range(n) if part[i] is None]

    carve = np.random.default_rng([seed, 0])
    for name, fraction, moved in (("test", test_fraction, report.carved_test_groups),
                                  ("val", val_fraction, report.carved_val_groups)):
        if fraction <= 0 or any(p == name for p in part):
            continue
        pool = sorted({groups[i] for i in range(n) if part[i] == "train" and has_mask[i]})
        k = max(1, int(math.floor(fraction * len(pool) + 0.5)))
        if len(pool) - k < 2:  # too few groups to hold out any and still train
            continue
        chosen = {pool[j] for j in carve.permutation(len(pool))[:k]}
        moved.extend(sorted(chosen))
        for i in range(n):
            if part[i] == "train" and groups[i] in chosen:
                part[i] = name if has_mask[i] else None
                if part[i] is None:
                    report.excluded.append(i)

    if digests is not None:
        seen = {digests[i] for i in range(n) if part[i] == "train"}
        for i in range(n):
            if part[i] in ("val", "test") and digests[i] in seen:
                part[i] = None
                report.duplicates_dropped.append(i)

    if val_count > 0:
        pool = sorted({groups[i] for i in range(n) if part[i] == "train" and has_mask[i]})
        order = [pool[j] for j in np.random.default_rng([seed, 2]).permutation(len(pool))]
        have = sum(p == "val" for p in part)
        for g in order:
            if have >= val_count or len(pool) - len(report.carved_val_groups) <= 2:
                break
            report.carved_val_groups.append(g)
            for i in range(n):
                if part[i] == "train" and groups[i] == g:
                    part[i] = "val" if has_mask[i] else None
                    have += has_mask[i]
                    if part[i] is None:
                        report.excluded.append(i)

    train = [i for i in range(n) if part[i] == "train"]
    labelled_rows = [i for i in train if has_mask[i]]
    if labelled_by == "group":
        units = sorted({groups[i] for i in labelled_rows})
    else:
        units = labelled_rows
    if not units:
        raise ValueError("the training pool has no images with masks: nothing can be labelled")
    if labelled_count > len(units):
        raise ValueError(f"labelled_count ({labelled_count}) exceeds the {len(units)} labelled "
                         f"{'groups' if labelled_by == 'group' else 'images'} of the training pool")
    report.labelled_units = len(units)
    k = labelled_size(len(units), labelled_fraction, labelled_count)
    order = np.random.default_rng([seed, 1]).permutation(len(units))
    chosen_units = {units[j] for j in order[:k]}
    if labelled_by == "group":
        labelled = [i for i in labelled_rows if groups[i] in chosen_units]
    else:
        labelled = sorted(chosen_units)
    in_l = set(labelled)
    split = Split(labelled=sorted(int(i) for i in labelled),
                  unlabelled=[int(i) for i in train if i not in in_l],
                  val=[i for i in range(n) if part[i] == "val"],
                  test=[i for i in range(n) if part[i] == "test"])
    report.excluded.sort()
    return split, report
