"""The report's rows: finished runs grouped by labelled share (and protocol) and ablation cell, each
group's mean +- sample std over seeds of every metric, and its p-values against the reference cells
(paired t-test over common seeds, else Welch).
"""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

from scipy import stats

CELL_ORDER = ("supervised", "bn_mix", "bn_stats", "pseudo_label", "mean_teacher", "cps", "simclr_pretrain", "simclr_dl",
              "cl", "cl_hn", "cr", "cl_cr", "cssl", "supervised_all")
METHOD_NAMES = {
    "supervised": "Supervised",
    "cl": "CL",
    "cl_hn": "CL + hard neg.",
    "cr": "CR",
    "cl_cr": "CL + CR",
    "cssl": "CSSL (CL + hard neg. + CR)",
    "supervised_all": "All labelled (reference)",
    "bn_mix": "BN mix (control)",
    "bn_stats": "BN stats only (control)",
    "pseudo_label": "Pseudo-label",
    "mean_teacher": "Mean Teacher",
    "cps": "CPS (network A)",
    "simclr_pretrain": "SimCLR pretraining",
    "simclr_dl": "SimCLR on D_L only (control)",
}
# The cells every other row is tested against (same labelled share): supervised always, CSSL and the
# bn_mix control (unlabelled images in the BatchNorm batches, no loss on them) when the table has them.
REFERENCES = ("supervised", "cssl", "bn_mix")
# Columns beside the main metric when the runs logged them: mean +- std over seeds, no p-value (p is
# for the main metric only). The per-image metrics of cssl_ray.evaluation.surface; the distances are in pixels of
# the evaluated (resized) image, lower is better.
EXTRA_METRICS = {
    "test_dice_image_mean": "Dice per image",
    "test_hd95_mean": "HD95 (px) ↓",
    "test_asd_mean": "ASD (px) ↓",
}
NO_CELL = "(no cell)"
COVERAGE_PREFIX = "round1_pseudo_coverage/"
PATCHES_KEY = "patches_per_step_mean"


def class_prefix(metric: str) -> str:
    """Per-class keys that go with ``metric``: test_iou_mean -> "test_iou/"; else "test_dice/"."""
    return metric[: -len("_mean")] + "/" if metric.endswith("_mean") else "test_dice/"


def classes_of(runs: list[dict], metric: str = "test_dice_mean") -> list[str]:
    """Class names of the per-class metric keys (``test_dice/<class>``) present in ``runs``."""
    prefix = class_prefix(metric)
    names = {k[len(prefix):] for r in runs for k in r["metrics"] if k.startswith(prefix)}
    return sorted(names)


def extras_of(runs: list[dict], metric: str = "test_dice_mean") -> list[str]:
    """The ``EXTRA_METRICS`` some run in ``runs`` logged, other than the main metric, in table order."""
    return [k for k in EXTRA_METRICS if k != metric and any(k in r["metrics"] for r in runs)]


def labelled_of(run: dict) -> str:
    """The group a run is compared within: its labelled share (``cssl.labelled_count`` when
    positive, else the fraction) and, for runs that record it, its ``train.protocol`` ("3 images,
    joint"): every cell is tested against the supervised reference of its own share and protocol."""
    tags = run["tags"]
    count = tags.get("cssl.labelled_count", "")
    share = tags.get("cssl.labelled_fraction", "?")
    try:
        if int(count) > 0:
            share = f"{int(count)} images"
    except ValueError:
        pass
    protocol = tags.get("cssl.protocol")
    return f"{share}, {protocol}" if protocol else share


def share_key(label: str) -> tuple[int, float, str]:
    try:
        return (0, float(label.replace(",", " ").split()[0]), label)
    except (ValueError, IndexError):
        return (1, 0.0, label)


def cell_rank(cell: str) -> tuple[int, str]:
    return (CELL_ORDER.index(cell), "") if cell in CELL_ORDER else (len(CELL_ORDER), cell)


def finite_values(runs: list[dict], key: str) -> list[float]:
    vals = [r["metrics"].get(key) for r in runs]
    return [float(v) for v in vals if v is not None and math.isfinite(v)]


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """(mean, sample std); std is None for fewer than two values, both None for none."""
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(var)


def _by_seed(runs: list[dict], metric: str) -> dict[str, float]:
    """Main-metric value per seed (the mean if a seed ran twice); runs without a seed are left out."""
    per: dict[str, list[float]] = defaultdict(list)
    for r in runs:
        seed = r["tags"].get("cssl.seed")
        v = r["metrics"].get(metric)
        if seed is not None and v is not None and math.isfinite(v):
            per[seed].append(float(v))
    return {s: sum(v) / len(v) for s, v in per.items()}


def p_value(runs: list[dict], sup_runs: list[dict], metric: str) -> tuple[float | None, str]:
    """p of ``metric`` in ``runs`` vs ``sup_runs`` and the test used ("paired", "welch", "n/a")."""
    a, b = _by_seed(runs, metric), _by_seed(sup_runs, metric)
    common = sorted(set(a) & set(b))
    if len(common) >= 2:
        p = stats.ttest_rel([a[s] for s in common], [b[s] for s in common]).pvalue
        test = "paired"
    else:
        xa, xb = finite_values(runs, metric), finite_values(sup_runs, metric)
        if len(xa) < 2 or len(xb) < 2:
            return None, "n/a"
        p = stats.ttest_ind(xa, xb, equal_var=False).pvalue
        test = "welch"
    p = float(p)
    return (p, test) if math.isfinite(p) else (None, "n/a")  # zero variance gives NaN


def last_metric(metric: str) -> str:
    """The last round's key of a test metric: test_dice_mean -> test_last_dice_mean."""
    return "test_last_" + metric.removeprefix("test_")


def coverage_classes(runs: list[dict]) -> list[str]:
    """Classes with a round-1 pseudo-label coverage in some run, in the order first logged."""
    return list(dict.fromkeys(k[len(COVERAGE_PREFIX):] for r in runs for k in r["metrics"]
                              if k.startswith(COVERAGE_PREFIX)))


def build_rows(runs: list[dict], metric: str = "test_dice_mean") -> list[dict[str, Any]]:
    """One row per (labelled share, cell) of ``runs`` (dicts as from ``cssl_ray.tracking.runs.find_runs``).

    Each row: labelled, cell, method, n (runs), metric, runs, ``extras`` (``extras_of(runs)``, the
    same for every row), ``stats`` {key: (mean, std)} for the main metric, every per-class key and
    the extras, and ``p`` (float, None = n/a) with ``test``
    ("paired" | "welch" | "n/a" | "reference" for the supervised row); ``vs`` {reference cell: (p,
    test)} for each of ``REFERENCES`` (the same against CSSL and bn_mix; absent when the table has
    no such cell).
    """
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in runs:
        groups[(labelled_of(r), r["tags"].get("cssl.cell") or NO_CELL)].append(r)
    prefix = class_prefix(metric)
    extras = extras_of(runs, metric)
    last = last_metric(metric)
    has_last = any(last in r["metrics"] for r in runs)
    coverage = coverage_classes(runs)
    keys = ([metric] + [last] * has_last + [prefix + c for c in classes_of(runs, metric)] + extras
            + [COVERAGE_PREFIX + c for c in coverage] + [PATCHES_KEY, "val_dice_mean_start", "val_dice_mean_last"])
    # supervised always gets a column; CSSL and bn_mix when the table has them
    refs = [ref for ref in REFERENCES if ref == "supervised" or any(c == ref for _, c in groups)]
    rows = []
    for (labelled, cell), group in sorted(groups.items(), key=lambda kv: (share_key(kv[0][0]), cell_rank(kv[0][1]))):
        row = {
            "labelled": labelled,
            "cell": cell,
            "method": METHOD_NAMES.get(cell, cell),
            "n": len(group),
            "metric": metric,
            "extras": extras,
            "runs": group,
            "stats": {k: mean_std(finite_values(group, k)) for k in keys},
            "best_rounds": [int(v) for v in finite_values(group, "best_round")],
            "has_last": has_last,
            "coverage": coverage,
        }
        row["vs"] = {ref: _vs(group, cell, groups.get((labelled, ref)), ref, metric) for ref in refs}
        if has_last:
            row["vs_last"] = _vs(group, cell, groups.get((labelled, "supervised")), "supervised", last)
        row["p"], row["test"] = row["vs"]["supervised"]
        rows.append(row)
    return rows


def _vs(runs: list[dict], cell: str, ref_runs: list[dict] | None, ref: str, metric: str) -> tuple[float | None, str]:
    """(p, test) of ``runs`` against the reference cell ``ref``'s runs of the same labelled share."""
    if cell == ref:
        return None, "reference"
    return p_value(runs, ref_runs, metric) if ref_runs else (None, "n/a")
