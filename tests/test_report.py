"""cssl_ray.experiments.report: table building on hand-computed runs, and the CLI end to end on a temp store."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
from scipy import stats

from cssl_ray.experiments import report
from cssl_ray.experiments.report_rows import build_rows, classes_of
from cssl_ray.experiments.report_table import extras_note, format_markdown, table_cells
from cssl_ray.tracking.runs import get_run
from cssl_ray.tracking.tracker import Tracker


def _run(cell: str, seed: int | None, dice: float | None, frac: str = "0.1", **per_class: float) -> dict:
    tags = {"cssl.cell": cell, "cssl.labelled_fraction": frac, "cssl.labelled_count": "0"}
    if seed is not None:
        tags["cssl.seed"] = str(seed)
    metrics = {f"test_dice/{k}": v for k, v in per_class.items()}
    if dice is not None:
        metrics["test_dice_mean"] = dice
    return {"run_id": f"{cell}-{seed}-{frac}", "name": cell, "status": "FINISHED", "tags": tags,
            "params": {}, "metrics": metrics, "start_time": 0}


SUP = [_run("supervised", 0, 0.70, liver=0.9), _run("supervised", 1, 0.72, liver=0.8),
       _run("supervised", 2, 0.74, liver=0.7)]
CSSL = [_run("cssl", 0, 0.75, liver=0.9), _run("cssl", 1, 0.80, liver=0.9), _run("cssl", 2, 0.79)]
CL = [_run("cl", 5, 0.73), _run("cl", 6, 0.77)]  # no seed in common with supervised: Welch
CR = [_run("cr", 9, 0.71)]  # one run: no test
CL_HN = [_run("cl_hn", 0, None)]  # metric missing


def _row(rows: list[dict], cell: str, frac: str = "0.1") -> dict:
    return next(r for r in rows if r["cell"] == cell and r["labelled"] == frac)


def test_means_std_and_paired_p() -> None:
    rows = build_rows(SUP + CSSL, "test_dice_mean")
    sup, cssl = _row(rows, "supervised"), _row(rows, "cssl")
    assert sup["stats"]["test_dice_mean"] == pytest.approx((0.72, 0.02))
    assert cssl["stats"]["test_dice_mean"] == pytest.approx((0.78, math.sqrt(0.0014 / 2)))
    assert cssl["stats"]["test_dice/liver"] == pytest.approx((0.9, 0.0))  # seed 2 lacks it
    assert sup["p"] is None and sup["test"] == "reference"
    # Oracle: d = (0.05, 0.08, 0.05), mean 0.06, sd sqrt(0.0003) -> t = 0.06 / (sd / sqrt(3)) = 6.
    d = [0.05, 0.08, 0.05]
    mean_d = sum(d) / 3
    sd_d = math.sqrt(sum((x - mean_d) ** 2 for x in d) / 2)
    t = mean_d / (sd_d / math.sqrt(3))
    assert t == pytest.approx(6.0)
    assert cssl["test"] == "paired"
    assert cssl["p"] == pytest.approx(2 * stats.t.sf(t, df=2))


def test_baselines_are_tested_against_cssl_and_the_bn_mix_control() -> None:
    bn = [_run("bn_mix", 0, 0.73), _run("bn_mix", 1, 0.76), _run("bn_mix", 2, 0.76)]
    mt = [_run("mean_teacher", 0, 0.74), _run("mean_teacher", 1, 0.79), _run("mean_teacher", 2, 0.77)]
    rows = build_rows(SUP + CSSL + bn + mt, "test_dice_mean")
    row = _row(rows, "mean_teacher")
    for ref, runs in (("supervised", SUP), ("cssl", CSSL), ("bn_mix", bn)):
        want = stats.ttest_rel([r["metrics"]["test_dice_mean"] for r in mt],
                               [r["metrics"]["test_dice_mean"] for r in runs]).pvalue
        assert row["vs"][ref] == (pytest.approx(want), "paired")
    assert _row(rows, "cssl")["vs"]["cssl"] == (None, "reference")
    assert _row(rows, "bn_mix")["vs"]["bn_mix"] == (None, "reference")
    header, body = table_cells(rows, [])
    assert header[-4:] == ["p vs supervised", "p vs CSSL", "p vs bn_mix", "best round"]
    assert [r["cell"] for r in rows] == ["supervised", "bn_mix", "mean_teacher", "cssl"]
    assert body[1][:2] == ["0.1", "BN mix (control)"] and body[1][-2] == "—"
    plain = build_rows(SUP + CSSL, "test_dice_mean")  # no bn_mix cell: no bn_mix column
    assert table_cells(plain, [])[0][-3:] == ["p vs supervised", "p vs CSSL", "best round"]


def test_welch_fallback_and_na() -> None:
    rows = build_rows(SUP + CL + CR + CL_HN, "test_dice_mean")
    cl = _row(rows, "cl")
    a, b = [0.73, 0.77], [0.70, 0.72, 0.74]
    va, vb = 0.02 ** 2 * 2 / 1, 0.02 ** 2  # sample variances: 0.0008, 0.0004
    se2 = va / len(a) + vb / len(b)
    t = (sum(a) / 2 - sum(b) / 3) / math.sqrt(se2)
    df = se2 ** 2 / ((va / 2) ** 2 / 1 + (vb / 3) ** 2 / 2)
    assert cl["test"] == "welch" and cl["p"] == pytest.approx(2 * stats.t.sf(abs(t), df))
    assert _row(rows, "cr")["p"] is None and _row(rows, "cr")["test"] == "n/a"
    cl_hn = _row(rows, "cl_hn")
    assert cl_hn["p"] is None and cl_hn["stats"]["test_dice_mean"] == (None, None)

    md = format_markdown(rows, classes_of(SUP + CL, "test_dice_mean"))
    lines = md.splitlines()
    assert lines[0] == "| labelled | method | n | dice_mean | dice/liver | p vs supervised | best round |"
    assert "| 0.1 | Supervised | 3 | 0.720 ± 0.020 | 0.800 ± 0.100 | — | n/a |" in lines
    assert "| 0.1 | CR | 1 | 0.710 | n/a | n/a | n/a |" in lines
    assert "| 0.1 | CL + hard neg. | 1 | n/a | n/a | n/a | n/a |" in lines
    assert "(Welch)" in next(l for l in lines if "| CL |" in l)


def test_no_supervised_and_ordering() -> None:
    runs = (CSSL + [_run("zzz", 0, 0.5), _run("abc", 0, 0.5), _run("cr", 0, 0.6, frac="0.05")]
            + CL + SUP + [_run("supervised", 0, 0.6, frac="0.05")])
    rows = build_rows(runs, "test_dice_mean")
    assert [(r["labelled"], r["cell"]) for r in rows] == [
        ("0.05", "supervised"), ("0.05", "cr"),
        ("0.1", "supervised"), ("0.1", "cl"), ("0.1", "cssl"), ("0.1", "abc"), ("0.1", "zzz"),
    ]
    assert _row(rows, "cr", "0.05")["p"] is None  # one run each side
    only = build_rows(CSSL, "test_dice_mean")
    assert only[0]["p"] is None and only[0]["test"] == "n/a"  # no supervised cell at all
    assert format_markdown([], []) == ""


def test_each_protocol_is_tested_against_its_own_supervised_cell() -> None:
    def tagged(runs: list[dict], protocol: str, shift: float = 0.0) -> list[dict]:
        out = []
        for r in runs:
            m = {**r["metrics"], "test_dice_mean": r["metrics"]["test_dice_mean"] + shift}
            out.append({**r, "run_id": f"{r['run_id']}-{protocol}", "metrics": m,
                        "tags": {**r["tags"], "cssl.protocol": protocol}})
        return out
    # joint's supervised cell scores 0.1 more: against it, joint CSSL (same shift) is what paper CSSL is
    # against paper supervised; against paper's supervised it would be far better
    runs = tagged(SUP + CSSL, "paper") + tagged(SUP + CSSL, "joint", 0.1)
    rows = build_rows(runs, "test_dice_mean")
    assert [(r["labelled"], r["cell"]) for r in rows] == [
        ("0.1, joint", "supervised"), ("0.1, joint", "cssl"), ("0.1, paper", "supervised"), ("0.1, paper", "cssl")]
    paper, joint_ = _row(rows, "cssl", "0.1, paper"), _row(rows, "cssl", "0.1, joint")
    assert joint_["p"] == pytest.approx(paper["p"])
    assert joint_["p"] == pytest.approx(stats.ttest_rel([0.85, 0.90, 0.89], [0.80, 0.82, 0.84]).pvalue)


def _write_store(uri: str) -> str:
    tracker = Tracker(uri, "abl")
    parent = tracker.start_parent("ablate", {"cssl.kind": "ablate"}, session="s")
    values = {"supervised": [0.70, 0.72, 0.74], "cl": [0.74, 0.75, 0.77], "cssl": [0.75, 0.80, 0.79]}
    for cell, dice in values.items():
        for seed, v in enumerate(dice):
            tags = {"cssl.kind": "ablation", "cssl.cell": cell, "cssl.seed": str(seed),
                    "cssl.labelled_fraction": "0.1", "cssl.labelled_count": "0"}
            run = tracker.start_child(parent, f"{cell}-{seed}", f"{cell} {seed}", {}, tags)
            if cell != "supervised":
                for step in range(4):
                    omega = 0.1 * step + (0.1 if cell == "cssl" else 0.0) + 0.01 * seed
                    tracker.log_metrics(run, {"omega": omega}, step=step)
            per_image = {"test_dice_image_mean": v - 0.05, "test_hd95_mean": 10 * (1 - v), "test_asd_mean": 1.0}
            tracker.log_metrics(run, {"test_dice_mean": v, "test_dice/liver": v + 0.1, **per_image}, step=4)
            tracker.end(run, "FINISHED")
    crashed = tracker.start_child(parent, "cr-0", "cr 0", {}, {"cssl.cell": "cr"})
    tracker.log_metrics(crashed, {"test_dice_mean": 0.1}, step=0)
    tracker.end(crashed, "FAILED")  # not FINISHED: left out of the table
    tracker.end(parent, "FINISHED")
    tracker.start_parent("tune", {"cssl.kind": "tune"}, session="later")  # newer, but not ablate
    return parent


def test_main_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    _write_store(uri)
    out = tmp_path / "out"
    assert report.main(["--experiment", "abl", "--tracking-uri", uri, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for name in ("report.md", "report.png", "omega.png", "cells.png"):
        assert (out / name).stat().st_size > 0
    md = (out / "report.md").read_text()
    assert "| dice_mean | dice/liver | Dice per image | HD95 (px) ↓ | ASD (px) ↓ | p vs supervised |" in md
    assert ("| 0.1 | Supervised | 3 | 0.720 ± 0.020 | 0.820 ± 0.020 | 0.670 ± 0.020 | 2.800 ± 0.200 "
            "| 1.000 ± 0.000 | — |") in md
    assert "lower is better" in md  # the per-image metrics' note
    assert "| 0.1 | CSSL (CL + hard neg. + CR) | 3 | 0.780 ± 0.026 |" in md
    assert "CR |" not in md.replace("+ CR", "")  # the FAILED cr run is not reported
    assert "0.720 ± 0.020" in printed and str(out / "omega.png") in printed


def test_main_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    parent = _write_store(uri)
    capsys.readouterr()
    assert report.main(["--experiment", "nope", "--tracking-uri", uri, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "experiment 'nope' not found" in err and "abl" in err

    tracker = Tracker(uri, "empty")
    assert report.main(["--experiment", "empty", "--tracking-uri", uri]) == 2
    assert "no parent run" in capsys.readouterr().err
    tracker.start_parent("p", {"cssl.kind": "ablate"}, session="x")
    assert report.main(["--experiment", "empty", "--tracking-uri", uri]) == 2
    assert "no FINISHED child runs" in capsys.readouterr().err
    assert report.main(["--experiment", "abl", "--tracking-uri", uri, "--parent", "f" * 32]) == 2
    assert "not found" in capsys.readouterr().err
    assert get_run(uri, parent)["status"] == "FINISHED"


def test_best_round_column_and_the_stage_a_note() -> None:
    def with_round(run, best_round):
        return {**run, "metrics": {**run["metrics"], "best_round": float(best_round)}}

    runs = [with_round(r, 0) for r in SUP] + [with_round(r, 0) for r in CL]
    rows = build_rows(runs, "test_dice_mean")
    md = format_markdown(rows, [])
    assert "| 0, 0, 0 |" in next(l for l in md.splitlines() if "| Supervised |" in l)
    # CL kept stage A's weights in every seed: one line names it and why (no val figures: the fallback)
    assert "CL (every cell): stage A's weights were tested in every seed" in md
    assert "no round beat stage A's validation score" in md
    rows = build_rows([with_round(r, 0) for r in SUP] + [with_round(CL[0], 3)], "test_dice_mean")
    md = format_markdown(rows, [])
    assert "stage A's weights were tested" not in md and "| 3 |" in md
    # the reason, from the rounds' validation Dice where they started and after the last round
    lowered = [{**r, "metrics": {**r["metrics"], "val_dice_mean_start": 0.80, "val_dice_mean_last": v}}
               for r, v in zip((with_round(r, 0) for r in CL), (0.70, 0.74))]
    md = format_markdown(build_rows(runs[:3] + lowered, "test_dice_mean"), [])
    assert "their rounds lowered validation Dice from 0.800 (stage A) to 0.720 (last round)" in md


def test_last_round_column_coverage_and_patches() -> None:
    """The last round's test metric beside the selected one, with its own paired p vs supervised; round
    1's coverage per class and the realised patches per step, means over seeds."""
    def extra(run: dict, last: float, **more: float) -> dict:
        return {**run, "metrics": {**run["metrics"], "test_last_dice_mean": last, **more}}

    sup = [extra(r, v) for r, v in zip(SUP, (0.69, 0.70, 0.73))]
    cssl = [extra(r, v, **{"round1_pseudo_coverage/background": c, "round1_pseudo_coverage/liver": 0.5,
                           "patches_per_step_mean": 90.0 + i})
            for i, (r, v, c) in enumerate(zip(CSSL, (0.72, 0.74, 0.78), (0.99, 0.97, 0.98)))]
    rows = build_rows(sup + cssl, "test_dice_mean")
    header, body = table_cells(rows, [])
    assert header == ["labelled", "method", "n", "dice_mean", "dice_mean, last round", "coverage, round 1",
                      "patches / step", "p vs supervised", "p vs CSSL", "p (last round) vs supervised", "best round"]
    row = dict(zip(header, body[1]))
    assert row["dice_mean, last round"] == "0.747 ± 0.031"
    assert row["coverage, round 1"] == "background 98%, liver 50%" and row["patches / step"] == "91"
    expected = stats.ttest_rel([0.72, 0.74, 0.78], [0.69, 0.70, 0.73]).pvalue
    assert row["p (last round) vs supervised"] == f"{expected:.3g}"
    assert dict(zip(header, body[0]))["coverage, round 1"] == "—"  # supervised labels nothing


def test_per_image_columns_beside_dice_without_p_values() -> None:
    def with_surface(run: dict, hd95: float, asd: float, dice_image: float) -> dict:
        extra = {"test_hd95_mean": hd95, "test_asd_mean": asd, "test_dice_image_mean": dice_image}
        return {**run, "metrics": {**run["metrics"], **extra}}

    sup = [with_surface(r, hd, hd / 4, 0.6) for r, hd in zip(SUP, (4.0, 6.0, 8.0))]
    cssl = [with_surface(r, hd, hd / 4, 0.7) for r, hd in zip(CSSL, (3.0, 3.0, 6.0))]
    rows = build_rows(sup + cssl + CL, "test_dice_mean")  # CL's runs predate the new metrics
    assert rows[0]["extras"] == ["test_dice_image_mean", "test_hd95_mean", "test_asd_mean"]
    assert _row(rows, "supervised")["stats"]["test_hd95_mean"] == pytest.approx((6.0, 2.0))
    assert _row(rows, "cssl")["stats"]["test_asd_mean"] == pytest.approx((1.0, math.sqrt(3) / 4))
    assert _row(rows, "cl")["stats"]["test_hd95_mean"] == (None, None)
    md = format_markdown(rows, [])
    lines = md.splitlines()
    assert lines[0] == ("| labelled | method | n | dice_mean | Dice per image | HD95 (px) ↓ | ASD (px) ↓ "
                        "| p vs supervised | p vs CSSL | best round |")  # p: the main metric's only
    assert "| 0.1 | Supervised | 3 | 0.720 ± 0.020 | 0.600 ± 0.000 | 6.000 ± 2.000 | 1.500 ± 0.500 | — |" in md
    assert "| 0.1 | CL | 2 | 0.750 ± 0.028 | n/a | n/a | n/a |" in md
    assert "image diagonal" in extras_note(rows)
    # without the metrics: no columns and no note (older runs' tables unchanged)
    plain = build_rows(SUP + CSSL, "test_dice_mean")
    assert plain[0]["extras"] == [] and extras_note(plain) == ""
    assert "HD95" not in format_markdown(plain, [])
    # HD95 as the main metric: its column and p-value, the other two beside it
    by_hd = build_rows(sup + cssl, "test_hd95_mean")
    header, _ = table_cells(by_hd, [])
    assert header[3:6] == ["HD95 (px) ↓", "Dice per image", "ASD (px) ↓"]
    assert _row(by_hd, "cssl")["test"] == "paired"


def _write_parent(tracker: Tracker, name: str, values: dict[str, list[float]]) -> str:
    parent = tracker.start_parent(name, {"cssl.kind": "ablate"}, session=name)
    for cell, dice in values.items():
        for seed, v in enumerate(dice):
            tags = {"cssl.kind": "ablation", "cssl.cell": cell, "cssl.seed": str(seed),
                    "cssl.labelled_fraction": "0.1", "cssl.labelled_count": "0"}
            run = tracker.start_child(parent, f"{cell}-{seed}", f"{cell} {seed}", {}, tags)
            tracker.log_metrics(run, {"test_dice_mean": v}, step=1)
            tracker.end(run, "FINISHED")
    tracker.end(parent, "FINISHED")
    return parent


def test_several_parents_merge_into_one_table(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """An ablation extended by a second ``ablate --cells`` grid: the later cells are paired with the
    first grid's supervised runs of the same seeds; a cell and seed under two parents is refused."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = Tracker(uri, "abl")
    first = _write_parent(tracker, "first", {"supervised": [0.70, 0.72, 0.74], "bn_mix": [0.71, 0.72, 0.76]})
    later = _write_parent(tracker, "later", {"cps": [0.75, 0.80, 0.79]})
    out = tmp_path / "out"
    assert report.main(["--experiment", "abl", "--tracking-uri", uri, "--out", str(out)]) == 0
    alone = (out / "report.md").read_text()  # the newest parent only: CPS with nothing to test against
    assert "| CPS (network A) | 3 |" in alone and "Supervised" not in alone

    assert report.main(["--experiment", "abl", "--tracking-uri", uri, "--out", str(out),
                        "--parent", first, later, first]) == 0
    md = (out / "report.md").read_text()
    assert f"first ({first}) + later ({later})" in md and "9 finished runs" in md
    line = next(x for x in md.splitlines() if "| CPS" in x)
    want = stats.ttest_rel([0.75, 0.80, 0.79], [0.70, 0.72, 0.74]).pvalue
    assert f"| {want:.3g} |" in line  # paired against the first grid's supervised
    capsys.readouterr()

    again = _write_parent(tracker, "again", {"supervised": [0.70]})  # seed 0 of supervised again
    assert report.main(["--experiment", "abl", "--tracking-uri", uri, "--parent", first, again]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "cell supervised (0.1) seed 0" in err and first in err and again in err
