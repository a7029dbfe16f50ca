"""The report's table as text: the header and cells of the rows (shared by Markdown and the PNG),
the Markdown table and the notes under it (stage A's weights kept, the per-image columns).
"""
from __future__ import annotations

from cssl_ray.experiments.report_rows import (
    COVERAGE_PREFIX,
    EXTRA_METRICS,
    PATCHES_KEY,
    REFERENCES,
    class_prefix,
    finite_values,
    last_metric,
    mean_std,
)

REFERENCE_NAMES = {"supervised": "supervised", "cssl": "CSSL", "bn_mix": "bn_mix"}
DASH = "—"


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


def header_name(key: str) -> str:
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
    header = (["labelled", "method", "n"] + [header_name(k) for k in keys]
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
    start = mean_std([v for row in kept for v in finite_values(row["runs"], "val_dice_mean_start")])[0]
    last = mean_std([v for row in kept for v in finite_values(row["runs"], "val_dice_mean_last")])[0]
    if start is not None and last is not None:
        verb = "lowered" if last < start - 1e-3 else "raised" if last > start + 1e-3 else "left"
        why = (f"their rounds {verb} validation Dice from {start:.3f} (stage A) to {last:.3f} "
               f"(last round){' without beating it' if verb != 'lowered' else ''}")
    else:
        why = "no round beat stage A's validation score"
    others = [r for r in rows if r["cell"] not in ("supervised", "supervised_all")]
    every = " (every cell)" if len(kept) == len(others) else ""
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
