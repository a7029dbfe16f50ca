"""The report's figures: the table drawn with matplotlib, a box of the main metric per cell, and
omega (the silhouette score) per round of the cells with and without CR (the paper's Fig. 3), its
history read back from MLflow.
"""
from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

from cssl_ray.experiments.report_rows import METHOD_NAMES, cell_rank, finite_values, mean_std, share_key
from cssl_ray.experiments.report_table import header_name, table_cells
from cssl_ray.tracking.runs import metric_history

WITHOUT_CR = ("cl", "cl_hn")
WITH_CR = ("cl_cr", "cssl")


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
    shares = sorted({row["labelled"] for row in rows}, key=share_key)
    panels = [[row for row in rows if row["labelled"] == s and finite_values(row["runs"], row["metric"])]
              for s in shares]
    panels = [(s, p) for s, p in zip(shares, panels) if p]
    if not panels:
        return False
    plt = _plt()
    width = max(4.0, 1.1 * max(len(p) for _, p in panels) + 1.5)
    fig, axes = plt.subplots(len(panels), 1, figsize=(width, 3.2 * len(panels)), squeeze=False)
    for ax, (share, panel) in zip(axes[:, 0], panels):
        values = [finite_values(row["runs"], row["metric"]) for row in panel]
        ax.boxplot(values, showmeans=True)
        for i, v in enumerate(values, start=1):
            ax.scatter([i] * len(v), v, s=12, color="black", zorder=3)
        ax.set_xticks(range(1, len(panel) + 1), [row["method"] for row in panel], rotation=25, ha="right",
                      fontsize=8)
        ax.set_ylabel(header_name(panel[0]["metric"]))
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
            round_of = {step: int(value) for step, value in metric_history(uri, run["run_id"], "round")}
            for step, value in metric_history(uri, run["run_id"], "omega"):
                if math.isfinite(value):
                    per_step[round_of.get(step, step)].append(value)
        if per_step:
            curves[(row["labelled"], row["cell"])] = [
                (step, *mean_std(per_step[step])) for step in sorted(per_step)
            ]
    return curves


def draw_omega(curves: dict, path: Path, title: str = "", runs_of: dict | None = None) -> None:
    """Fig. 3 style: one panel per labelled share, solid = with CR, dashed = without CR.

    ``runs_of`` maps (labelled, cell) to its runs, for the legend's n.
    """
    plt = _plt()
    from matplotlib.ticker import MaxNLocator

    runs_of = runs_of or {}
    labels = sorted({lab for lab, _ in curves}, key=share_key)
    fig, axes = plt.subplots(1, len(labels), figsize=(5.5 * len(labels), 4), squeeze=False)
    for ax, lab in zip(axes[0], labels):
        for (l, cell), points in sorted(curves.items(), key=lambda kv: cell_rank(kv[0][1])):
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
