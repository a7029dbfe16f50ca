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
    pytest.mark.slow,  # Ray's start and the labeller pool: ~20 s
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),  # Ray 2.60's own deprecated fields
]


def test_patch_stream_smoke_writes_json(tmp_path):
    import ray

    bench = load_benchmark("patch_stream")
    out = tmp_path / "patch_stream.json"
    result = bench.main(["--smoke", "--labellers", "2", "--json", str(out)])  # 2: a pool of several
    assert not ray.is_initialized()  # the benchmark stopped the Ray it started
    written = json.loads(out.read_text())
    for key in ("machine", "config", "labelling_in_process", "consumption", "stream", "ray_run", "targets", "pass"):
        assert key in written, key
    assert written["config"]["smoke"] is True and written["ray_run"] is None
    steps = written["config"]["steps"]
    assert written["consumption"]["steps"] == steps > 1
    for n in ("2",):
        s = written["stream"][n]
        assert s["steps"] == steps and s["streamed"]["steps"] == steps  # every step arrived, in both uses
        # the stream labels what the in-process labelling labels (batching may flip a pixel at the threshold)
        assert s["pseudo_coverage"] == pytest.approx(written["labelling_in_process"]["pseudo_coverage"], abs=1e-3)
        assert s["ratio"] == pytest.approx(s["steps_per_s"] / written["consumption"]["steps_per_s"])
        assert 0.0 <= s["streamed"]["data_wait_frac"] <= 1.0 and math.isfinite(s["first_step_s"])
        assert written["pass"][n] == {"ratio": s["ratio"] >= 2.0, "data_wait_frac": s["streamed"]["data_wait_frac"] < 0.05}
    assert result["stream"].keys() == written["stream"].keys()
