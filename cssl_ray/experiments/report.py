"""The paper's results table (and its Fig. 3 silhouette plot) read back from MLflow.

    python -m cssl_ray.report --experiment NAME [--tracking-uri URI] [--parent RUN_ID]
                              [--metric test_dice_mean] [--out DIR]

Takes the FINISHED child runs of one parent run (default: the newest ``cssl.kind=ablate`` parent,
else the newest ``tune`` parent), groups them by labelled share and ablation cell, and writes
into ``--out`` (default ``runs/report/<experiment>``):

    report.md    the Markdown table: mean +- sample std (ddof=1) over seeds per group of the main
                 metric on the selected (best-validation) weights and on the last round's weights
                 (``last round``, with its own p vs supervised: a handful of validation images cannot
                 hide the rounds), its per-class values and the per-image metrics (``EXTRA_METRICS``:
                 Dice per image, HD95, ASD, when the runs logged them), round 1's pseudo-label
                 coverage per class and the realised contrastive patches per step (the instruments of
                 ``records.rounds_summary``), and the p-value of the main metric
                 (only of it) against the Supervised cell of the same labelled share (paired t-test
                 over common seeds when >= 2, else Welch when both have >= 2 runs);
                 with baselines in the grid also against CSSL and against the bn_mix control
                 (``REFERENCES``: a column each when the table has that cell)
    report.png   the same table drawn with matplotlib
    cells.png    the main metric of every run, a box per cell (seeds as points), per labelled share
    omega.png    omega (the silhouette score) per validation step, mean +- std over seeds, of the
                 runs without CR (cl, cl_hn) and with CR (cl_cr, cssl), when any logged omega

The files are also attached to the parent run (artifacts under ``report/``). MLflow is read only through ``cssl_ray.tracking.store``.
"""
from __future__ import annotations

import argparse
import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from scipy import stats

from cssl_ray.tracking import store as tracking

CELL_ORDER = ("supervised", "bn_mix", "pseudo_label", "mean_teacher", "cps", "simclr_pretrain", "cl", "cl_hn", "cr",
              "cl_cr", "cssl", "supervised_all")
METHOD_NAMES = {
    "supervised": "Supervised",
    "cl": "CL",
    "cl_hn": "CL + hard neg.",
    "cr": "CR",
    "cl_cr": "CL + CR",
    "cssl": "CSSL (CL + hard neg. + CR)",
    "supervised_all": "All labelled (reference)",
    "bn_mix": "BN mix (control)",
    "pseudo_label": "Pseudo-label",
    "mean_teacher": "Mean Teacher",
    "cps": "CPS (network A)",
    "simclr_pretrain": "SimCLR pretraining",
}
# The cells every other row is tested against (same labelled share): supervised always, CSSL and the
# bn_mix control (unlabelled images in the BatchNorm batches, no loss on them) when the table has them.
REFERENCES = ("supervised", "cssl", "bn_mix")
REFERENCE_NAMES = {"supervised": "supervised", "cssl": "CSSL", "bn_mix": "bn_mix"}
WITHOUT_CR = ("cl", "cl_hn")
WITH_CR = ("cl_cr", "cssl")
# Columns beside the main metric when the runs logged them: mean +- std over seeds, no p-value (p is
# for the main metric only). The per-image metrics of cssl_ray.evaluation.surface; the distances are in pixels of
# the evaluated (resized) image, lower is better.
EXTRA_METRICS = {
    "test_dice_image_mean": "Dice per image",
    "test_hd95_mean": "HD95 (px) ↓",
    "test_asd_mean": "ASD (px) ↓",
}
NO_CELL = "(no cell)"
DASH = "—"


# ---------------------------------------------------------------------------------------------
# Pure table building


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


def _num(label: str) -> tuple[int, float, str]:
    try:
        return (0, float(label.replace(",", " ").split()[0]), label)
    except (ValueError, IndexError):
        return (1, 0.0, label)


def _cell_rank(cell: str) -> tuple[int, str]:
    return (CELL_ORDER.index(cell), "") if cell in CELL_ORDER else (len(CELL_ORDER), cell)


def _finite_values(runs: list[dict], key: str) -> list[float]:
    vals = [r["metrics"].get(key) for r in runs]
    return [float(v) for v in vals if v is not None and math.isfinite(v)]


def _summary(values: list[float]) -> tuple[float | None, float | None]:
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
        xa, xb = _finite_values(runs, metric), _finite_values(sup_runs, metric)
        if len(xa) < 2 or len(xb) < 2:
            return None, "n/a"
        p = stats.ttest_ind(xa, xb, equal_var=False).pvalue
        test = "welch"
    p = float(p)
    return (p, test) if math.isfinite(p) else (None, "n/a")  # zero variance gives NaN


def last_metric(metric: str) -> str:
    """The last round's key of a test metric: test_dice_mean -> test_last_dice_mean."""
    return "test_last_" + metric.removeprefix("test_")


COVERAGE_PREFIX = "round1_pseudo_coverage/"
PATCHES_KEY = "patches_per_step_mean"


def coverage_classes(runs: list[dict]) -> list[str]:
    """Classes with a round-1 pseudo-label coverage in some run, in the order first logged."""
    return list(dict.fromkeys(k[len(COVERAGE_PREFIX):] for r in runs for k in r["metrics"]
                              if k.startswith(COVERAGE_PREFIX)))


def build_rows(runs: list[dict], metric: str = "test_dice_mean") -> list[dict[str, Any]]:
    """One row per (labelled share, cell) of ``runs`` (dicts as from ``tracking.find_runs``).

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
    for (labelled, cell), group in sorted(groups.items(), key=lambda kv: (_num(kv[0][0]), _cell_rank(kv[0][1]))):
        row = {
            "labelled": labelled,
            "cell": cell,
            "method": METHOD_NAMES.get(cell, cell),
            "n": len(group),
            "metric": metric,
            "extras": extras,
            "runs": group,
            "stats": {k: _summary(_finite_values(group, k)) for k in keys},
            "best_rounds": [int(v) for v in _finite_values(group, "best_round")],
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


def _fmt_stat(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "n/a"
    return f"{mean:.3f}" if std is None else f"{mean:.3f} ± {std:.3f}"


def _fmt_p(p: float | None, test: str) -> str:
    if test == "reference":
        return DASH
    if p is None:
        return "n/a"
    return f"{p:.3g}" + (" (Welch)" if test == "welch" else "")


def _header_name(key: str) -> str:
    if key in EXTRA_METRICS:
        return EXTRA_METRICS[key]
    if key.startswith("test_last_"):
        return key[len("test_last_"):] + ", last round"
    return key[len("test_"):] if key.startswith("test_") else key


def table_cells(rows: list[dict], classes: list[str]) -> tuple[list[str], list[list[str]]]:
    """Header and body strings of the table (shared by Markdown and PNG)."""
    if not rows:
        return [], []
    metric = rows[0]["metric"]
    has_last = rows[0].get("has_last", False)
    keys = ([metric] + [last_metric(metric)] * has_last + [class_prefix(metric) + c for c in classes]
            + rows[0].get("extras", []))
    refs = [ref for ref in REFERENCES if ref in rows[0].get("vs", {"supervised": None})]
    coverage = rows[0].get("coverage", [])
    patches = any(row["stats"].get(PATCHES_KEY, (None, None))[0] is not None for row in rows)
    header = (["labelled", "method", "n"] + [_header_name(k) for k in keys]
              + ["coverage, round 1"] * bool(coverage) + ["patches / step"] * patches
              + [f"p vs {REFERENCE_NAMES[ref]}" for ref in refs] + ["p (last round) vs supervised"] * has_last
              + ["best round"])
    body = [
        [row["labelled"], row["method"], str(row["n"])]
        + [_fmt_stat(*row["stats"].get(k, (None, None))) for k in keys]
        + [_fmt_coverage(row, coverage)] * bool(coverage)
        + [_fmt_mean(row["stats"].get(PATCHES_KEY, (None, None))[0], "{:.0f}")] * patches
        + [_fmt_p(*row.get("vs", {}).get(ref, (row["p"], row["test"]))) for ref in refs]
        + [_fmt_p(*row.get("vs_last", (None, "n/a")))] * has_last
        + [_fmt_best_rounds(row.get("best_rounds", []))]
        for row in rows
    ]
    return header, body


def _fmt_mean(value: float | None, fmt: str) -> str:
    return DASH if value is None else fmt.format(value)


def _fmt_coverage(row: dict, classes: list[str]) -> str:
    """Round 1's pseudo-label coverage per class, mean over seeds, e.g. "background 99%, nucleus 78%"
    (a dash for cells that pseudo-label nothing; "none predicted" for a class no pixel was predicted as)."""
    parts = []
    for c in classes:
        mean = row["stats"].get(COVERAGE_PREFIX + c, (None, None))[0]
        if mean is not None:
            parts.append(f"{c} {100 * mean:.0f}%")
        elif any(COVERAGE_PREFIX + c in r["metrics"] for r in row["runs"]):
            parts.append(f"{c} none predicted")
    return ", ".join(parts) or DASH


def _fmt_best_rounds(rounds: list[int]) -> str:
    """The rounds whose weights were tested, e.g. "0, 0, 3" (0 = stage A's, the supervised model)."""
    return ", ".join(map(str, sorted(rounds))) if rounds else "n/a"


def stage_a_note(rows: list[dict]) -> str:
    """A line for the cells whose every tested run kept stage A's weights (best round 0 in every seed):
    no round beat stage A on validation, so their selected test metrics are the supervised model's.
    The reason is read from the runs: their mean val Dice where the rounds started and after the last
    round (``records.rounds_summary``); the last-round column shows what the rounds did to the test."""
    kept = [row for row in rows if row.get("best_rounds") and not any(row["best_rounds"])
            and row["cell"] not in ("supervised", "supervised_all")]
    if not kept:
        return ""
    names = ", ".join(row["method"] for row in kept)
    start = _summary([v for row in kept for v in _finite_values(row["runs"], "val_dice_mean_start")])[0]
    last = _summary([v for row in kept for v in _finite_values(row["runs"], "val_dice_mean_last")])[0]
    if start is not None and last is not None:
        verb = "lowered" if last < start - 1e-3 else "raised" if last > start + 1e-3 else "left"
        why = (f"their rounds {verb} validation Dice from {start:.3f} (stage A) to {last:.3f} "
               f"(last round){' without beating it' if verb != 'lowered' else ''}")
    else:
        why = "no round beat stage A's validation score"
    every = " (every cell)" if len(kept) == len([r for r in rows if r["cell"] not in ("supervised", "supervised_all")]) else ""
    return (f"{names}{every}: stage A's weights were tested in every seed (best round 0): {why}; "
            f"their best-validation columns are the supervised model's, the last-round column is what the rounds did.")


def extras_note(rows: list[dict]) -> str:
    """A line on the per-image columns' conventions, for tables that have them."""
    if not any(row.get("extras") for row in rows):
        return ""
    return ("Dice per image, HD95 and ASD: per image and foreground class, then the mean over images and "
            "classes (cssl_ray/evaluation/surface.py); distances in pixels of the evaluated (resized) image, lower is "
            "better; an image where only one of prediction and target has the class scores the image diagonal.")


def format_markdown(rows: list[dict], classes: list[str]) -> str:
    """The rows as a Markdown table (Welch p-values are marked; supervised shows a dash)."""
    header, body = table_cells(rows, classes)
    if not header:
        return ""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    note = stage_a_note(rows)
    return "\n".join(lines) + "\n" + (f"\n{note}\n" if note else "")


# ---------------------------------------------------------------------------------------------
# Plots


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def draw_table(rows: list[dict], classes: list[str], path: Path, title: str = "") -> None:
    plt = _plt()
    header, body = table_cells(rows, classes)
    # Size the figure from the text: ~0.085 in per character at 9 pt, plus cell padding.
    chars = [max(len(c) for c in col) for col in zip(header, *body)]
    widths = [0.085 * n + 0.35 for n in chars]
    fig, ax = plt.subplots(figsize=(sum(widths), 0.3 * (len(body) + 1) + (0.4 if title else 0.1)))
    ax.axis("off")
    table = ax.table(cellText=body, colLabels=header, cellLoc="center", bbox=[0, 0, 1, 1],
                     colWidths=[w / sum(widths) for w in widths])
    table.auto_set_font_size(False)
    table.set_fontsize(9)
    if title:
        ax.set_title(title, fontsize=10)
    fig.savefig(path, dpi=150, bbox_inches="tight")
    plt.close(fig)


def draw_cells(rows: list[dict], path: Path, title: str = "") -> bool:
    """A box of the main metric per cell (its runs as points), one panel per labelled share; False
    (nothing drawn) when no row has a value."""
    shares = sorted({row["labelled"] for row in rows}, key=_num)
    panels = [[row for row in rows if row["labelled"] == s and _finite_values(row["runs"], row["metric"])]
              for s in shares]
    panels = [(s, p) for s, p in zip(shares, panels) if p]
    if not panels:
        return False
    plt = _plt()
    width = max(4.0, 1.1 * max(len(p) for _, p in panels) + 1.5)
    fig, axes = plt.subplots(len(panels), 1, figsize=(width, 3.2 * len(panels)), squeeze=False)
    for ax, (share, panel) in zip(axes[:, 0], panels):
        values = [_finite_values(row["runs"], row["metric"]) for row in panel]
        ax.boxplot(values, showmeans=True)
        for i, v in enumerate(values, start=1):
            ax.scatter([i] * len(v), v, s=12, color="black", zorder=3)
        ax.set_xticks(range(1, len(panel) + 1), [row["method"] for row in panel], rotation=25, ha="right",
                      fontsize=8)
        ax.set_ylabel(_header_name(panel[0]["metric"]))
        ax.set_title(f"labelled: {share}", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=150, bbox_inches="tight")
    plt.close(fig)
    return True


def omega_curves(uri: str, rows: list[dict]) -> dict[tuple[str, str], list[tuple[int, float, float | None]]]:
    """(labelled, cell) -> [(round, mean omega, std or None)] for the CL cells with / without CR.

    Averaged by CSSL round, not by validation step: stage A stops early, so the step of round r
    differs between seeds (runs without a ``round`` metric fall back to the step)."""
    curves = {}
    for row in rows:
        if row["cell"] not in WITHOUT_CR + WITH_CR:
            continue
        per_step: dict[int, list[float]] = defaultdict(list)
        for run in row["runs"]:
            round_of = {step: int(value) for step, value in tracking.metric_history(uri, run["run_id"], "round")}
            for step, value in tracking.metric_history(uri, run["run_id"], "omega"):
                if math.isfinite(value):
                    per_step[round_of.get(step, step)].append(value)
        if per_step:
            curves[(row["labelled"], row["cell"])] = [
                (step, *_summary(per_step[step])) for step in sorted(per_step)
            ]
    return curves


def draw_omega(curves: dict, path: Path, title: str = "", runs_of: dict | None = None) -> None:
    """Fig. 3 style: one panel per labelled share, solid = with CR, dashed = without CR.

    ``runs_of`` maps (labelled, cell) to its runs, for the legend's n.
    """
    plt = _plt()
    from matplotlib.ticker import MaxNLocator

    runs_of = runs_of or {}
    labels = sorted({lab for lab, _ in curves}, key=_num)
    fig, axes = plt.subplots(1, len(labels), figsize=(5.5 * len(labels), 4), squeeze=False)
    for ax, lab in zip(axes[0], labels):
        for (l, cell), points in sorted(curves.items(), key=lambda kv: _cell_rank(kv[0][1])):
            if l != lab:
                continue
            steps = [p[0] for p in points]
            mean = [p[1] for p in points]
            std = [p[2] or 0.0 for p in points]
            style, cr = ("-", "with CR") if cell in WITH_CR else ("--", "without CR")
            label = f"{METHOD_NAMES.get(cell, cell)} ({cr})"
            if (l, cell) in runs_of:
                label += f", n={len(runs_of[(l, cell)])}"
            (line,) = ax.plot(steps, mean, style, marker=".", label=label)
            ax.fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                            color=line.get_color(), alpha=0.2)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("round")
        ax.set_ylabel("omega (silhouette)")
        ax.set_title(f"labelled {lab}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cssl_ray.report", description=__doc__.splitlines()[0])
    p.add_argument("--experiment", required=True, help="MLflow experiment name")
    p.add_argument("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI, else ./mlflow.db")
    p.add_argument("--parent", default=None, help="parent run id (default: newest ablate parent)")
    p.add_argument("--metric", default="test_dice_mean", help="main metric (default test_dice_mean)")
    p.add_argument("--out", default=None, help="output folder (default runs/report/<experiment>)")
    return p


def _select_runs(uri: str, args: argparse.Namespace) -> tuple[dict, list[dict]]:
    tracking.require_experiment(uri, args.experiment)
    if args.parent:
        parent = tracking.get_run(uri, args.parent)
    else:
        parent = tracking.latest_parent(uri, args.experiment, kind="ablate") \
            or tracking.latest_parent(uri, args.experiment, kind="tune")
        if parent is None:
            raise ValueError(f"experiment '{args.experiment}' in {uri} has no parent run")
    children = tracking.find_runs(uri, args.experiment, parent_id=parent["run_id"])
    finished = [r for r in children if r["status"] == "FINISHED"]
    if not finished:
        raise ValueError(
            f"parent run {parent['run_id']} ({parent['name']}) has no FINISHED child runs "
            f"({len(children)} children in other states)"
        )
    return parent, finished


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    uri = tracking.tracking_uri(args.tracking_uri)
    try:
        parent, runs = _select_runs(uri, args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out or Path("runs") / "report" / args.experiment)
    out.mkdir(parents=True, exist_ok=True)

    rows = build_rows(runs, args.metric)
    classes = classes_of(runs, args.metric)
    table = format_markdown(rows, classes)
    title = f"{args.experiment} / {parent['name']} ({parent['run_id']})"
    extras = extras_note(rows)
    note = (
        f"# {title}\n\n{len(runs)} finished runs; mean ± sample std over seeds; p: paired t-test "
        f"of {args.metric} vs the named cell over common seeds (Welch where marked).\n\n"
        + (f"{extras}\n\n" if extras else "")
    )
    (out / "report.md").write_text(note + table)
    draw_table(rows, classes, out / "report.png", title)
    paths = [out / "report.md", out / "report.png"]
    if draw_cells(rows, out / "cells.png", title):
        paths.append(out / "cells.png")
    curves = omega_curves(uri, rows)
    if curves:
        runs_of = {(r["labelled"], r["cell"]): r["runs"] for r in rows}
        draw_omega(curves, out / "omega.png", title, runs_of)
        paths.append(out / "omega.png")

    tracking.Tracker(uri, args.experiment).log_artifacts(parent["run_id"], out, "report")  # the parent holds its report
    print(table, end="")
    if not curves:
        print("no omega history in cells cl, cl_hn, cl_cr, cssl: omega.png not written")
    for p in paths:
        print(f"wrote {p}")
    print(f"browse: {tracking.ui_command(uri)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
