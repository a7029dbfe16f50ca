from __future__ import annotations

from cssl_ray.demo import ARMS, format_table, main


def test_format_table_mean_and_std():
    table = format_table({"supervised": [{"dice_mean": 0.2, "dice/blob": 0.4}, {"dice_mean": 0.4, "dice/blob": 0.6}],
                          "cssl": [{"dice_mean": 0.5, "dice/blob": float("nan")}]}, ["background", "blob"])
    lines = table.splitlines()
    assert lines[2] == "| supervised | 0.300 ± 0.141 | 0.500 ± 0.141 |"
    assert lines[3] == "| cssl | 0.500 | n/a |"


def test_supervised_arm_switches_everything_off():
    assert ARMS["supervised"] == dict(use_cl=False, use_cr=False, use_hard_negatives=False)


def test_demo_smoke_prints_both_arms(tmp_path, capsys):
    assert main(["--smoke", "--seeds", "0", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| supervised |" in out and "| cssl |" in out and "| supervised, all labels |" in out
    import json
    ref = json.loads((tmp_path / "reference_seed0" / "split.json").read_text())
    assert ref["unlabelled"] == []  # the ceiling sees every training mask
    assert (tmp_path / "supervised_seed0" / "best.pt").is_file()
    assert (tmp_path / "cssl_seed0" / "best.pt").is_file()
