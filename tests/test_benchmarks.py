"""Smoke test of benchmarks/train_step.py: runs at a tiny size and writes the JSON it promises.

No timing assertions: the figures depend on the machine and on what else runs on it.
"""
from __future__ import annotations

import json
import sys

import pytest
from benchmark_scripts import ROOT, load_benchmark


def test_train_step_smoke_writes_json(tmp_path, capsys):
    bench = load_benchmark("train_step")
    out = tmp_path / "train_step.json"
    result = bench.main(["--smoke", "--device", "cpu", "--json", str(out)])
    written = json.loads(out.read_text())
    for key in ("machine", "config", "flops_counted", "step", "flops_cl", "flops_cr", "parts_s", "supervised",
                "matmul", "ratio", "target", "pass", "conv_reference", "cuda_bf16"):
        assert key in written, key
    assert written["config"]["preset"] == "smoke"
    for key in ("median_s", "p10_s", "p90_s", "flops", "gflops_per_s", "images_per_s", "patches_per_s"):
        assert key in written["step"], key
    assert set(written["parts_s"]) == {"cl_forward", "cl_backward", "cr_forward", "cr_backward", "optimizer"}
    # The whole step's counted FLOPs are its two losses' (disjoint graphs, one shared model).
    assert written["step"]["flops"] > 0
    assert written["step"]["flops"] == written["flops_cl"] + written["flops_cr"]
    assert written["ratio"] == pytest.approx(written["step"]["gflops_per_s"] / written["matmul"]["gflops_per_s"])
    assert written["pass"] == (written["ratio"] >= written["target"])
    assert [r["level"] for r in written["conv_reference"]] == [0, 1, 2]  # smoke depth 2
    assert written["cuda_bf16"] is None
    assert result["ratio"] == written["ratio"]
    assert "ratio" in capsys.readouterr().out


def test_train_step_bad_geometry_is_one_line(tmp_path):
    bench = load_benchmark("train_step")
    with pytest.raises(SystemExit, match="train_step: patches.size"):
        bench.main(["--smoke", "--patch-size", "10", "--json", str(tmp_path / "x.json")])


def test_grad_sync_smoke_writes_json(tmp_path):
    """benchmarks/grad_sync.py: the trainer's explicit all-reduce against DDP on 2 gloo ranks. Run as a
    script: its spawned ranks import it as __main__ (a module loaded by path is none they can import)."""
    import subprocess
    import sys

    from benchmark_scripts import ROOT

    out = tmp_path / "grad_sync.json"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "grad_sync.py"), "--smoke", "--json", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    written = json.loads(out.read_text())
    for key in ("machine", "config", "step_s", "step_times_s", "explicit_over_ddp", "target", "pass"):
        assert key in written, key
    assert set(written["step_s"]) == {"none", "explicit", "ddp"}
    assert all(len(t) == 3 for t in written["step_times_s"].values())
    assert written["explicit_over_ddp"] == pytest.approx(written["step_s"]["explicit"] / written["step_s"]["ddp"])
    assert written["pass"] == (written["explicit_over_ddp"] <= written["target"])
    assert "explicit / ddp" in run.stdout


def test_round_probe_starts_every_variant_from_one_stage_a(tmp_path, capsys):
    probe = load_benchmark("round_probe")
    out = tmp_path / "probe.json"
    assert probe.main(["--config", "configs/smoke.yaml", "--seeds", "0", "--rounds", "2", "--variants", "supervised",
                       "cssl", "cssl+lsup", "--work", str(tmp_path / "work"), "--json", str(out)]) == 0
    records = json.loads(out.read_text())["records"]
    assert [r["variant"] for r in records] == ["supervised", "cssl", "cssl+lsup"]
    assert len({r["val_start"] for r in records}) == 1  # one stage A, shared through the cache
    assert len(list((tmp_path / "work" / "stage_a").glob("stage_a_*.pt"))) == 1
    assert all(r["rounds"] == 2 and len(r["val_curve"]) == 2 for r in records)
    assert records[2]["round1"]["loss_sup_ltot"] > 0 and "loss_sup_ltot" not in records[1]["round1"]
    assert "| cssl+lsup |" in capsys.readouterr().out
    assert probe.main(["--config", "configs/smoke.yaml", "--variants", "nope"]) == 2
    # plain names run the product's defaults; +bn_frozen names pin the statistics of before issue 13
    assert "train.ltot_bn" not in probe.VARIANTS["cssl"] and probe.VARIANTS["cssl+bn_frozen"]["train.ltot_bn"] == "frozen"


def test_stage_a_budget_curves_for_few_and_all_labels(tmp_path, capsys):
    budget = load_benchmark("stage_a_budget")
    out = tmp_path / "budget.json"
    assert budget.main(["--config", "configs/smoke.yaml", "--steps", "4", "--at", "2", "4", "--json", str(out)]) == 0
    runs = json.loads(out.read_text())["runs"]
    assert [r["labels"] for r in runs] == ["few", "all"]
    assert all([c["stage_a_step"] for c in r["curve"]][-1] == 4 for r in runs)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("| labels | 2 | 4 | first rate cut") and lines[2].startswith("| few |")


def test_gpu_check_dry_run_plans_every_figure_and_checks_the_runs():
    import subprocess
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run"], capture_output=True,
                          text=True, check=False)
    assert done.returncode == 0, done.stderr
    lines = [json.loads(x) for x in done.stdout.strip().splitlines()]
    assert [x["figure"] for x in lines] == ["ray_train_bf16_shared", "ray_train_fp16", "contrastive_loss_6528",
                                            "train_step_bf16"]
    assert all(x["planned"] for x in lines)
    assert [x.get("dry_run_ok") for x in lines[:2]] == [True, True]  # cssl_ray.experiments.train's own checks passed
    assert "--gpus-per-worker 0.5 --gpus-per-labeller 0.5" in lines[0]["command"]  # the labeller shares the GPU
    assert "train.amp=bf16" in lines[0]["command"] and "train.channels_last=true" in lines[0]["command"]


def test_gpu_check_on_cpu_prints_a_json_line_per_figure(tmp_path):
    check = load_benchmark("gpu_check")
    assert check.main(["--cpu", "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    figures = {f["figure"]: f for f in summary["figures"]}
    assert set(figures) == {"contrastive_loss_6528", "train_step_bf16"} and all(f["ok"] for f in figures.values())
    assert figures["contrastive_loss_6528"]["n"] == 256 and figures["contrastive_loss_6528"]["time_ms"] > 0
    assert 0 < figures["train_step_bf16"]["fp32_fraction_of_fp32_matmul"]


def test_gpu_check_failed_figure_is_a_line_not_a_crash(tmp_path):
    check = load_benchmark("gpu_check")
    line = check.run_figure({"figure": "x", "cmd": [sys.executable, "-c", "import sys; sys.exit('boom')"],
                             "read": None}, timeout=30)
    assert line["figure"] == "x" and not line["ok"] and line["error"] == "boom" and line["rc"] == 1
    line = check.run_figure({"figure": "y", "cmd": [sys.executable, "-c", "import time; time.sleep(5)"],
                             "read": None}, timeout=0.5)
    assert not line["ok"] and "timed out" in line["error"]


def test_stream_bytes_counts_both_designs_on_the_same_steps(tmp_path, capsys):
    bench = load_benchmark("stream_bytes")
    out = bench.main(["--geometry", "smoke", "--steps", "2", "--json", str(tmp_path / "s.json")])
    (r,) = out["runs"]
    assert r["patches_equal"] and r["before"]["patches_per_image"] > 0  # the same windows, drawn both ways
    h, w = r["config"]["data"]["image_size"]
    # the old request carried each image as float32 and its mask as int64; the new one its position
    assert r["before"]["request_bytes_per_image"] >= h * w * (4 + 8)
    assert r["now"]["request_bytes_per_image"] < r["before"]["request_bytes_per_image"] / 10
    assert h * w <= r["now"]["row_bytes_per_image"] < r["before"]["row_bytes_per_image"]  # uint8 labels + windows
    assert r["ratio"] > 1 and json.loads((tmp_path / "s.json").read_text())["runs"][0]["ratio"] == r["ratio"]
    assert "fewer bytes" in capsys.readouterr().out


def test_store_reads_decode_one_row_group_of_bounded_bytes(tmp_path, capsys):
    from cssl_ray.data.store import GROUP_BYTES, ROWS_PER_GROUP, group_full

    assert group_full(ROWS_PER_GROUP, 0) and group_full(1, GROUP_BYTES) and not group_full(1, GROUP_BYTES - 1)
    bench = load_benchmark("store_reads")
    out = bench.main(["--geometry", "nuclei", "--images", "20", "--reads", "6", "--json", str(tmp_path / "r.json")])
    (r,) = out["runs"]
    row = r["row_bytes"]  # 256 x 256 float32 + uint8 mask: 4 rows close a group (>= 1 MiB)
    assert r["before"]["rows_per_group_max"] == 16 and r["now"]["rows_per_group_max"] == -(-GROUP_BYTES // row)
    assert r["before"]["amplification"] > 10 and 1 <= r["now"]["amplification"] <= 4.01
    assert r["decoded_ratio"] > 3 and json.loads((tmp_path / "r.json").read_text())["runs"][0]["row_bytes"] == row
    assert "fewer bytes" in capsys.readouterr().out
