"""cluster/: the `ray up` YAML and the KubeRay RayJob parse, and agree with the CLI and each other.

Nothing here talks to a cloud; the files' commands are parsed with the project's own argparse.
"""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import yaml

from cssl_ray.train import parser as train_parser

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
IMAGE_DIR = "/home/ray/cssl_ray"  # where cluster/Dockerfile puts the repository


def _load(name: str) -> dict:
    data = yaml.safe_load((CLUSTER / name).read_text())
    assert isinstance(data, dict), name
    return data


def _ray_version(image: str) -> str:
    m = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py311-(cpu|gpu)", image)
    assert m, image
    return m.group(1)


def test_ray_up_cluster():
    c = _load("ray-cluster.yaml")
    assert c["provider"]["type"] in ("aws", "gcp")
    types = c["available_node_types"]
    assert c["head_node_type"] in types
    workers = {k: v for k, v in types.items() if k != c["head_node_type"]}
    assert workers, "no worker node type"
    gpu = [v for v in workers.values() if v["node_config"]["InstanceType"].startswith(("g", "p"))]  # AWS GPU families
    assert gpu and all(v["max_workers"] >= 1 for v in gpu)
    assert 1 <= max(v["max_workers"] for v in gpu) <= c["max_workers"]
    d = c["docker"]
    assert _ray_version(d["head_image"]) == _ray_version(d["worker_image"])
    assert d["worker_image"].endswith("-gpu")
    setup = " ".join(c["setup_commands"])
    assert "pip install" in setup and "-e ~/cssl_ray" in setup
    assert "constraints" not in setup  # the build machine's CPU torch pins must not reach GPU nodes
    assert c["file_mounts"]["~/cssl_ray"] == "."
    assert ".venv" in c["rsync_exclude"]
    assert any("ray start --head" in cmd for cmd in c["head_start_ray_commands"])
    assert any("$RAY_HEAD_IP" in cmd for cmd in c["worker_start_ray_commands"])


def test_rayjob_manifest():
    job = _load("rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:3] == ["python", "-m", "cssl_ray.train"]
    args = train_parser().parse_args(argv[3:])  # every flag is one the CLI knows
    assert args.address == "auto" and args.gpus_per_worker == 1 and not args.local
    assert args.storage_path.startswith(("s3://", "gs://"))
    assert Path(args.config).is_absolute() and args.config.startswith(IMAGE_DIR)
    assert (REPO / Path(args.config).relative_to(IMAGE_DIR)).is_file()

    env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert "CSSL_RAY_CACHE" in env["env_vars"]
    cluster = spec["rayClusterSpec"]
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    gpu_pods = 0
    for group in cluster["workerGroupSpecs"]:
        container = group["template"]["spec"]["containers"][0]
        assert container["image"] == head["image"]
        gpus = int(container["resources"]["limits"].get("nvidia.com/gpu", 0))
        gpu_pods += group["replicas"] * gpus
    assert args.workers * args.gpus_per_worker <= gpu_pods, "more Train workers than GPUs"

    dockerfile = (CLUSTER / "Dockerfile").read_text()
    base = re.search(r"^FROM (\S+)", dockerfile, re.M).group(1)
    assert _ray_version(base) == cluster["rayVersion"]
    assert f"WORKDIR {IMAGE_DIR}" in dockerfile and "constraints" not in dockerfile.split("RUN", 1)[1]
    for src in re.findall(r"^COPY \S+ (.+) \S+$", dockerfile, re.M):
        for path in src.split():
            assert (REPO / path).exists(), path


def test_ray_up_matches_rayjob_ray_version():
    c = _load("ray-cluster.yaml")
    assert _ray_version(c["docker"]["worker_image"]) == _load("rayjob.yaml")["spec"]["rayClusterSpec"]["rayVersion"]
