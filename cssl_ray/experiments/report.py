"""The paper's results table (and its Fig. 3 silhouette plot) read back from MLflow.

    python -m cssl_ray.report --experiment NAME [--tracking-uri URI] [--parent RUN_ID [RUN_ID ...]]
                              [--metric test_dice_mean] [--out DIR]

Takes the FINISHED child runs of one parent run (default: the newest ``cssl.kind=ablate`` parent,
else the newest ``tune`` parent), or of several named parents merged into one table (an ablation
extended by a later ``ablate --cells ...`` into the same store: its new cells are tested against the
first grid's supervised runs of the same seeds; a cell, share and seed found under two parents is an
error, never an average), groups them by labelled share and ablation cell, and writes into ``--out``
(default ``runs/report/<experiment>``):

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

The files are also attached to the (first named) parent run (artifacts under ``report/``). MLflow is read only
through ``cssl_ray.tracking.runs``. The rows: ``report_rows``; the table: ``report_table``; the
figures: ``report_figures``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cssl_ray.experiments.report_figures import draw_cells, draw_omega, draw_table, omega_curves
from cssl_ray.experiments.report_rows import build_rows, classes_of, labelled_of
from cssl_ray.experiments.report_table import extras_note, format_markdown
from cssl_ray.tracking.runs import find_runs, get_run, latest_parent, require_experiment
from cssl_ray.tracking.tracker import Tracker
from cssl_ray.tracking.uri import tracking_uri, ui_command


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cssl_ray.report", description=__doc__.splitlines()[0])
    p.add_argument("--experiment", required=True, help="MLflow experiment name")
    p.add_argument("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI, else ./mlflow.db")
    p.add_argument("--parent", nargs="+", default=None, metavar="RUN_ID",
                   help="parent run id(s) (default: newest ablate parent); several merge into one table")
    p.add_argument("--metric", default="test_dice_mean", help="main metric (default test_dice_mean)")
    p.add_argument("--out", default=None, help="output folder (default runs/report/<experiment>)")
    return p


def _seed_key(run: dict) -> tuple[str, str, str | None]:
    tags = run["tags"]
    return labelled_of(run), tags.get("cssl.cell", run["name"]), tags.get("cssl.seed")


def _children(uri: str, experiment: str, parent: dict) -> list[dict]:
    children = find_runs(uri, experiment, parent_id=parent["run_id"])
    finished = [r for r in children if r["status"] == "FINISHED"]
    if not finished:
        raise ValueError(
            f"parent run {parent['run_id']} ({parent['name']}) has no FINISHED child runs "
            f"({len(children)} children in other states)"
        )
    return finished


def _select_runs(uri: str, args: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    """The parents (the named ones in order, else the newest ablate/tune parent) and their FINISHED
    children; ``ValueError`` when a parent has none, or two parents hold the same cell, share and seed."""
    require_experiment(uri, args.experiment)
    if args.parent:
        parents = [get_run(uri, run_id) for run_id in dict.fromkeys(args.parent)]
    else:
        parent = latest_parent(uri, args.experiment, kind="ablate") \
            or latest_parent(uri, args.experiment, kind="tune")
        if parent is None:
            raise ValueError(f"experiment '{args.experiment}' in {uri} has no parent run")
        parents = [parent]
    runs: list[dict] = []
    owner: dict[tuple, str] = {}
    for parent in parents:
        children = _children(uri, args.experiment, parent)
        for run in children:
            key = _seed_key(run)
            if key[2] is not None and owner.get(key, parent["run_id"]) != parent["run_id"]:
                raise ValueError(
                    f"cell {key[1]} ({key[0]}) seed {key[2]} is under parents {owner[key]} and "
                    f"{parent['run_id']}: pass parents whose cells do not overlap"
                )
        owner.update({_seed_key(r): parent["run_id"] for r in children})
        runs += children
    return parents, runs


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    uri = tracking_uri(args.tracking_uri)
    try:
        parents, runs = _select_runs(uri, args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out or Path("runs") / "report" / args.experiment)
    out.mkdir(parents=True, exist_ok=True)

    rows = build_rows(runs, args.metric)
    classes = classes_of(runs, args.metric)
    table = format_markdown(rows, classes)
    title = f"{args.experiment} / " + " + ".join(f"{p['name']} ({p['run_id']})" for p in parents)
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

    Tracker(uri, args.experiment).log_artifacts(parents[0]["run_id"], out, "report")  # the parent holds its report
    print(table, end="")
    if not curves:
        print("no omega history in cells cl, cl_hn, cl_cr, cssl: omega.png not written")
    for p in paths:
        print(f"wrote {p}")
    print(f"browse: {ui_command(uri)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
