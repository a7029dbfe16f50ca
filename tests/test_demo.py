from __future__ import annotations

import pytest

from cssl_ray.experiments.demo import ARMS, format_table, main


def test_format_table_mean_and_std():
    table = format_table({"supervised": [{"dice_mean": 0.2, "dice/blob": 0.4}, {"dice_mean": 0.4, "dice/blob": 0.6}],
                          "cssl": [{"dice_mean": 0.5, "dice/blob": float("nan")}]}, ["background", "blob"])
    lines = table.splitlines()
    assert lines[2] == "| supervised | 0.300 ± 0.141 | 0.500 ± 0.141 |"
    assert lines[3] == "| cssl | 0.500 | n/a |"


def test_supervised_arm_switches_everything_off():
    assert ARMS["supervised"] == dict(use_cl=False, use_cr=False, use_hard_negatives=False)


def test_demo_smoke_prints_both_arms(tmp_path, capsys):
    assert main(["--synthetic", "--smoke", "--seeds", "0", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| supervised |" in out and "| cssl |" in out and "| supervised, all labels |" in out
    import json
    ref = json.loads((tmp_path / "reference_seed0" / "split.json").read_text())
    assert ref["unlabelled"] == []  # the ceiling sees every training mask
    assert (tmp_path / "supervised_seed0" / "best.pt").is_file()
    assert (tmp_path / "cssl_seed0" / "best.pt").is_file()


@pytest.mark.slow
def test_space_demo_smoke_tunes_ablates_and_reports(tmp_path, capsys):
    """The default demo's pipeline (tune -> ablate -> report) on the smoke space, in-process trials."""
    from conftest_ray import ray_test_env

    from cssl_ray.config import load_config
    from cssl_ray.tracking.runs import find_runs

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with ray_test_env("cssl_demo_test"):
        assert main(["--smoke", "--seeds", "1", "--out", str(tmp_path / "demo"), "--tracking-uri", store]) == 0
    out = capsys.readouterr().out
    assert "best trial" in out and "| Supervised |" in out and "demo wall time" in out
    runs = find_runs(store, "smoke")
    kinds = sorted(r["tags"].get("cssl.kind", "") for r in runs)
    assert kinds.count("trial") == 2 and kinds.count("ablation") == 2  # 2 tune trials, 2 cells x 1 seed
    cells = [r for r in runs if r["tags"].get("cssl.kind") == "ablation"]
    assert sorted((r["tags"]["cssl.cell"], r["tags"]["cssl.seed"]) for r in cells) == [("cssl", "0"), ("supervised", "0")]
    for r in cells:  # the cell's switches are the run's params; every run finished with test metrics
        on = str(r["tags"]["cssl.cell"] == "cssl")
        assert r["params"]["train.use_cl"] == on and r["params"]["train.use_cr"] == on
        assert r["params"]["train.use_hard_negatives"] == on
        assert r["status"] == "FINISHED" and "test_dice_mean" in r["metrics"]
    best = load_config(tmp_path / "demo" / "smoke-tune" / "best_config.yaml")  # ablate ran at the tuned config
    assert all(r["params"]["contrastive.tau"] == str(best.contrastive.tau) for r in cells)
    assert (tmp_path / "demo" / "smoke-ablate" / "report" / "report.md").exists()
    # the ablation's parent run holds the report, its figures and the fixed config
    from cssl_ray.tracking.runs import latest_parent
    from cssl_ray.tracking.uri import client
    parent = latest_parent(store, "smoke", kind="ablate")["run_id"]
    assert {a.path for a in client(store).list_artifacts(parent, "report")} >= {
        "report/report.md", "report/report.png", "report/cells.png"}
    assert "fixed_config.yaml" in {a.path for a in client(store).list_artifacts(parent)}
    assert "models:/smoke-ablate/1" in out


def test_the_demo_warms_stage_a_only_when_the_search_leaves_it_alone(tmp_path):
    """nuclei_demo searches only what comes after stage A: its ablation's seed-1 stage A can train
    beside the search's; a space that searches the stage-A rate cannot."""
    from cssl_ray.experiments.demo import DEMO_SPACE, searches_stage_a
    from cssl_ray.experiments.search_space import load_space

    demo = load_space(DEMO_SPACE)
    assert not searches_stage_a(demo, demo.base_config())
    text = DEMO_SPACE.read_text().replace("optim.cssl_lr:", "optim.lr:")
    (tmp_path / "lr.yaml").write_text(text.replace("base: ../configs/", f"base: {DEMO_SPACE.parents[1]}/configs/"))
    lr = load_space(tmp_path / "lr.yaml")
    assert searches_stage_a(lr, lr.base_config())
