"""A two-node loopback cluster (``ray.cluster_utils.Cluster``): ``run_ray`` puts one Train worker on each node.

The real path: ``run_ray(address=cluster.address)`` with the smoke config and 2 workers (gloo over
127.0.0.1, the Ray Data patch stream, checkpoints). ``run_ray`` has no placement-strategy argument,
so placement is forced by resources: each node has 3 logical CPUs and each worker asks 2
(``cpus_per_worker=2``), so no node holds two workers (what ``STRICT_SPREAD`` would say) and each
keeps 1 CPU for the Ray Data stages (labeller 0.5, samplers 0.25 each; none may starve, see
shared/ENVIRONMENT.md).

Where each rank ran: ``train_loop_per_worker`` is wrapped (module attribute, which ``run_ray``
looks up when it builds the TorchTrainer) by ``_recording_loop``, which writes
``ray.get_runtime_context().get_node_id()`` to ``<train.out_dir>/nodes/rank<r>`` and then runs
the real loop. Both nodes share this machine's disk, so the driver reads the files.

Ray 2.60 on this machine (shared/ENVIRONMENT.md): ``Cluster`` needs ``RAY_TMPDIR`` set and
``$RAY_TMPDIR/ray`` created first; it is stopped with ``cluster.shutdown()``, never ``ray stop``.
"""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest_ray import descendant_processes, ray_test_env

from cssl_ray.config import from_dict
from cssl_ray.distributed import ray_train
from cssl_ray.distributed.stream import StreamResources
from cssl_ray.experiments.train import build_config

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),  # Ray 2.60's own deprecated fields
]

NODE_CPUS, WORKER_CPUS = 3, 2  # 2 * WORKER_CPUS > NODE_CPUS: one worker per node at most
RAY_PROCESS_WORDS = ("raylet", "gcs_server", "ray::", "default_worker.py", "log_monitor", "dashboard")


def _recording_loop(config: dict[str, Any]) -> None:
    """``train_loop_per_worker`` that first records this rank's node id under train.out_dir."""
    import ray
    import ray.train

    from cssl_ray.distributed.train_worker import (
        train_loop_per_worker,  # in a worker: the real one (no monkeypatch there)
    )

    rank = ray.train.get_context().get_world_rank()
    nodes = Path(from_dict(config["config"]).train.out_dir) / "nodes"
    nodes.mkdir(parents=True, exist_ok=True)
    (nodes / f"rank{rank}").write_text(ray.get_runtime_context().get_node_id())
    train_loop_per_worker(config)


def _ray_descendants() -> list[str]:
    """Command lines of this process's live descendants that look like Ray processes."""
    return [f"{pid}: {cmd[:120]}" for pid, cmd in descendant_processes().items()
            if any(w in cmd for w in RAY_PROCESS_WORDS)]


@pytest.fixture
def two_node_cluster():
    """Head + one worker node on 127.0.0.1, each NODE_CPUS logical CPUs; stopped afterwards."""
    from ray.cluster_utils import Cluster

    with ray_test_env("cssl_mn") as tmp:  # short: unix socket paths
        (tmp / "ray").mkdir()  # Cluster fails without it (shared/ENVIRONMENT.md)
        cluster = None
        try:
            cluster = Cluster(initialize_head=True,
                              head_node_args={"num_cpus": NODE_CPUS, "include_dashboard": False})
            cluster.add_node(num_cpus=NODE_CPUS)
            cluster.wait_for_nodes()
            yield cluster
        finally:
            if cluster is not None:
                cluster.shutdown()


def test_two_node_cluster_runs_one_worker_per_node(two_node_cluster, tmp_path, monkeypatch):
    import ray
    from ray import cloudpickle

    started = time.perf_counter()
    monkeypatch.setattr(ray_train, "train_loop_per_worker", _recording_loop)
    # Workers cannot import this test module (tests/ is not on their path): send the wrapper by value.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    cfg = build_config(None, [f"train.out_dir={tmp_path}", "train.progress=false", "train.num_threads=1",
                              "train.max_rounds=1"], smoke=True)
    try:
        result = ray_train.run_ray(cfg, workers=2, cpus_per_worker=WORKER_CPUS, address=two_node_cluster.address,
                                   resources=StreamResources())
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    assert not ray.is_initialized()  # run_ray connected to the cluster, so it disconnected too

    nodes = {p.name: p.read_text() for p in (tmp_path / "nodes").iterdir()}
    cluster_nodes = {n.node_id for n in two_node_cluster.list_all_nodes()}
    assert sorted(nodes) == ["rank0", "rank1"]
    assert nodes["rank0"] != nodes["rank1"], nodes  # one worker per node
    assert set(nodes.values()) == cluster_nodes
    # The real run finished across the nodes: every round reported, ranks bitwise equal.
    assert [int(m["round"]) for m in result.reports] == [0, 1]
    assert all(m["ranks_identical"] == 1.0 for m in result.reports)
    for h in (h for h in result.history if h["stage"] == "round"):  # both ranks' streams fed the round
        assert h["patches"] > 0 and h["steps"] > 0 and math.isfinite(h["omega"]) and math.isfinite(h["val_dice_mean"])
        assert 0.0 <= h["data_wait_frac"] <= 1.0
    assert 0.0 <= result.test["dice_mean"] <= 1.0
    print(f"two-node run_ray: {time.perf_counter() - started:.1f} s, ranks on nodes {nodes}")


def test_no_ray_process_left_after_shutdown():
    """Runs after the cluster test (file order): every node's processes are gone."""
    deadline = time.time() + 15
    left = _ray_descendants()
    while left and time.time() < deadline:
        time.sleep(0.5)
        left = _ray_descendants()
    assert not left, left
