"""Smoke test of benchmarks/patch_stream.py: runs at a tiny size and writes the JSON it promises.

No timing assertions: the figures depend on the machine and on what else runs on it. It starts
(and stops) its own Ray instance, so it must not share a process with a running one.
"""
from __future__ import annotations

import json
import math

import pytest

from benchmark_scripts import load_benchmark


pytestmark = [
    pytest.mark.slow,  # Ray's start, the LabellerPool's and, with the baseline, two Ray Data pools: ~25 s
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),  # Ray 2.60's own deprecated fields
    # the smoke run's D_L is one image, so its sampling stage gets one block for 2 task slots
    pytest.mark.filterwarnings("ignore:The maximum number of concurrent tasks:UserWarning"),
]


def test_patch_stream_smoke_writes_json(tmp_path, capsys):
    import ray

    bench = load_benchmark("patch_stream")
    out = tmp_path / "patch_stream.json"
    result = bench.main(["--smoke", "--per-execution-baseline", "--json", str(out)])
    assert not ray.is_initialized()  # the benchmark stopped the Ray it started
    written = json.loads(out.read_text())
    for key in ("machine", "config", "reference_round_patches", "consumption", "stream_warmup", "stream", "ratio",
                "streamed_training", "collect_first_wait_share", "targets", "pass"):
        assert key in written, key
    assert written["config"]["smoke"] is True
    # The stream and the single-process reference sample the same images with the same weights.
    assert written["stream"]["patches"] == written["stream_warmup"]["patches"] > 0
    assert written["reference_round_patches"]["patches"] > 0
    assert written["ratio"] == pytest.approx(written["stream"]["patches_per_s"] / written["consumption"]["patches_per_s"])
    # Its stats rows give --local's pseudo-label statistics (batching may flip a pixel at the threshold).
    for key in ("pseudo_coverage", "pseudo_accuracy"):
        assert written["stream"][key] == pytest.approx(written["reference_round_patches"][key], abs=1e-3), key
    baseline = written["per_execution_baseline"]["stream"]  # the fresh-pool design: the same rows
    assert (baseline["patches"], baseline["rows"]) == (written["stream"]["patches"], written["stream"]["rows"])
    st = written["streamed_training"]
    assert st["batches"] == math.ceil(written["stream"]["rows"] / written["config"]["batch_patches"])
    assert math.ceil(written["stream"]["patches"] / written["config"]["batch_patches"]) <= st["steps"] <= st["batches"]
    assert 0.0 < st["wait_share"] <= 1.0 and math.isclose(st["wait_share"], st["wait_s"] / st["total_s"])
    assert written["pass"] == {"ratio": written["ratio"] >= 2.0, "wait_share": st["wait_share"] < 0.05}
    assert result["ratio"] == written["ratio"]
    assert "stream / consumption" in capsys.readouterr().out


def test_patch_stream_bad_arguments_are_one_line(tmp_path):
    bench = load_benchmark("patch_stream")
    with pytest.raises(SystemExit, match="patch_stream: --labellers 0"):
        bench.main(["--smoke", "--labellers", "0", "--json", str(tmp_path / "x.json")])
    with pytest.raises(SystemExit, match="patch_stream: "):
        bench.main(["--smoke", "--config", str(tmp_path / "missing.yaml"), "--json", str(tmp_path / "x.json")])
