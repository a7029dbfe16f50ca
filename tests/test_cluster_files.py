"""cluster/: the `ray up` YAML and the KubeRay RayJob parse, and agree with the CLI and each other;
every documented ``python -m cssl_ray.<cli>`` command passes the CLI's own checks (``--dry-run``).

Nothing here talks to a cloud or starts Ray: the commands of cluster/README.md, the manifests and
README.md's "Scaling out" are extracted from their shell text and run in-process with ``--dry-run``
against fake data (a 49-image nuclei wheel, a 7-image MoNuSeg prepared into a temporary cache that
the commands' ``s3://`` cache reads as ``file://``); paths they write go to a temporary folder.
"""
from __future__ import annotations

import importlib
import json
import re
import shlex
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from fixtures_formats import write_imagescope_xml, write_png, write_tiff
from fixtures_nuclei import WHEEL, write_wheel

from cssl_ray.experiments.train import parser as train_parser

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
    copied = set()
    for src in re.findall(r"^COPY \S+ (.+) \S+$", dockerfile, re.M):
        for path in src.split():
            assert (REPO / path).exists(), path
            copied.add(path)
    assert {"cssl_ray", "configs", "tune_spaces", "datasets"} <= copied  # what the documented commands read


def test_ray_up_matches_rayjob_ray_version():
    c = _load("ray-cluster.yaml")
    assert _ray_version(c["docker"]["worker_image"]) == _load("rayjob.yaml")["spec"]["rayClusterSpec"]["rayVersion"]


# ---------------------------------------------------------------------------------------------
# Every documented command passes the CLI's own checks (--dry-run).

DRY_RUN_CLIS = ("train", "tune", "ablate", "predict")
PATH_OPTIONS = ("--out", "--checkpoint", "--model", "--images", "--storage-path")  # rebased under a temp folder
SEPARATORS = ("&&", "||", ";", "|", "&")


def _joined_lines(text: str) -> list[str]:
    """Shell lines with backslash continuations joined."""
    out, current = [], ""
    for line in text.splitlines():
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
        else:
            out.append(current + line)
            current = ""
    return out + ([current] if current else [])


def _markdown_shell(text: str, section: str | None = None) -> str:
    """The ```bash blocks of a markdown text (of one ``## section`` only, if given)."""
    if section is not None:
        text = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    return "\n".join(re.findall(r"```bash\n(.*?)```", text, re.S))


def _yaml_shell(text: str) -> str:
    """A manifest's comment lines and every string in it (entrypoint, setup commands)."""
    comments = [m.group(1) for m in re.finditer(r"^\s*# ?(.*)$", text, re.M)]

    def strings(node):
        if isinstance(node, str):
            yield node
        elif isinstance(node, dict):
            for v in node.values():
                yield from strings(v)
        elif isinstance(node, list):
            for v in node:
                yield from strings(v)
    return "\n".join(comments + list(strings(yaml.safe_load(text))))


def documented_commands() -> list[tuple[str, str, list[str], dict[str, str]]]:
    """(where, cli, argv after ``python -m cssl_ray.<cli>``, env_vars of a ``--runtime-env-json``)."""
    sources = {
        "cluster/README.md": _markdown_shell((CLUSTER / "README.md").read_text()),
        "cluster/ray-cluster.yaml": _yaml_shell((CLUSTER / "ray-cluster.yaml").read_text()),
        "cluster/rayjob.yaml": _yaml_shell((CLUSTER / "rayjob.yaml").read_text()),
        "README.md#scaling-out": _markdown_shell((REPO / "README.md").read_text(), "Scaling out"),
    }
    found = []
    for where, text in sources.items():
        for line in _joined_lines(text):
            if "cssl_ray." not in line:
                continue
            tokens = shlex.split(line, comments=True)
            for i in range(len(tokens) - 2):
                if tokens[i].endswith("python") and tokens[i + 1] == "-m" and tokens[i + 2].startswith("cssl_ray."):
                    argv = []
                    for tok in tokens[i + 3:]:
                        if tok in SEPARATORS:
                            break
                        argv.append(tok)
                    env = {}
                    if "--runtime-env-json" in tokens[:i]:
                        env = json.loads(tokens[tokens.index("--runtime-env-json") + 1]).get("env_vars", {})
                    found.append((where, tokens[i + 2].split(".", 1)[1], argv, env))
    return found


COMMANDS = documented_commands()


def test_the_documented_commands_are_found():
    clis = {cli for _, cli, _, _ in COMMANDS}
    assert set(DRY_RUN_CLIS) <= clis and clis <= set(DRY_RUN_CLIS), clis
    assert {where for where, *_ in COMMANDS} >= {"cluster/README.md", "cluster/ray-cluster.yaml",
                                                  "cluster/rayjob.yaml", "README.md#scaling-out"}


@pytest.fixture(scope="module")
def fake_cache(tmp_path_factory) -> Path:
    """A dataset cache holding a fake nuclei wheel (30 train / 3 val / 16 test, as the real one: the
    same split sizes) in downloads/, its store at configs/nuclei.yaml's size, and a fake MoNuSeg
    prepared as tune_spaces/monuseg.yaml reads it (512 px, RGB): what the commands' caches point to."""
    from cssl_ray.config import load_config
    from cssl_ray.data.prepare import prepare
    from cssl_ray.experiments.search_space import load_space

    cache = tmp_path_factory.mktemp("cache")
    rng = np.random.default_rng(0)
    pairs = []
    for top, subset, n in (("training-data", "train", 30), ("validation-data", "val", 3), ("test-data", "test", 16)):
        for k in range(n):
            alpha = np.zeros((8, 8), np.uint8)
            alpha[1:5, 2:6] = 255
            mn = np.zeros((8, 8), np.uint8)
            mn[6, k % 8] = 255
            pairs.append(dict(top=top, set="2022-03-18_RPE1", stem=str(k), nuc=(alpha, None), mn=mn,
                              image=rng.integers(0, 4000, (8, 8)).astype(np.uint16),
                              expected=None, name=f"{subset}/2022-03-18_RPE1/{k}"))
    write_wheel(cache / "downloads" / WHEEL, pairs)
    d = load_config(REPO / "configs" / "nuclei.yaml").data
    prepare("nuclei", size=tuple(d.image_size), channels=d.in_channels, normalise=d.normalise, cache=cache)

    raw = tmp_path_factory.mktemp("monuseg")
    square = [(2.0, 2.0), (8.0, 2.0), (8.0, 8.0), (2.0, 8.0)]
    for k in range(7):
        stem = f"TCGA-{k:02d}-0001-01Z-00-DX1"
        image = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
        if k < 6:
            top = raw / "MoNuSeg 2018 Training Data"
            write_tiff(top / "Tissue Images" / f"{stem}.tif", image)
            write_imagescope_xml(top / "Annotations" / f"{stem}.xml", [square])
        else:
            write_tiff(raw / "MoNuSegTestData" / f"{stem}.tif", image)
            write_imagescope_xml(raw / "MoNuSegTestData" / f"{stem}.xml", [square])
    d = load_space(REPO / "tune_spaces" / "monuseg.yaml").base_config().data
    prepare("monuseg", raw, size=tuple(d.image_size), channels=d.in_channels, normalise=d.normalise, cache=cache)
    return cache


def _local_argv(argv: list[str], scratch: Path) -> list[str]:
    """The documented argv with the image's paths mapped to this checkout and output paths to ``scratch``."""
    out = list(argv)
    for i, tok in enumerate(out):
        if tok.startswith(IMAGE_DIR + "/"):
            out[i] = str(REPO / Path(tok).relative_to(IMAGE_DIR))
        elif i and out[i - 1] in PATH_OPTIONS and "://" not in tok:
            out[i] = str(scratch / tok.lstrip("/~"))
    return out


def _write_predict_inputs(argv: list[str]) -> None:
    """A checkpoint of configs/nuclei.yaml's model and two images where the command reads them."""
    import torch

    from cssl_ray.config import load_config, to_dict
    from cssl_ray.models import create_model

    cfg = load_config(REPO / "configs" / "nuclei.yaml")
    model = create_model(cfg.model, cfg.data.in_channels, cfg.data.num_classes)
    flag = "--model" if "--model" in argv else "--checkpoint"
    checkpoint = Path(argv[argv.index(flag) + 1])
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "config": to_dict(cfg)}, checkpoint)
    images = Path(argv[argv.index("--images") + 1])
    for k in range(2):
        write_png(images / f"cell_{k}.png", np.full((12, 10), 40 * k, np.uint8))


@pytest.mark.parametrize("where, cli, argv, env", COMMANDS,
                         ids=[f"{w}:{cli}:{i}" for i, (w, cli, _, _) in enumerate(COMMANDS)])
def test_documented_command_passes_dry_run(where, cli, argv, env, fake_cache, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)  # `ray job submit --working-dir .`: the repository is the working folder
    monkeypatch.setenv("CSSL_RAY_CACHE", str(fake_cache))  # never the user's cache, never the network
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for key, value in env.items():
        if key == "CSSL_RAY_CACHE":  # a bucket -> the fake cache as a URI; a folder -> the fake cache
            value = fake_cache.as_uri() if "://" in value else str(fake_cache)
        monkeypatch.setenv(key, value)
    scratch = tmp_path / "scratch"
    local = _local_argv(argv, scratch)
    if cli == "predict":
        _write_predict_inputs(local)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))

    rc = importlib.import_module(f"cssl_ray.{cli}").main(local + ["--dry-run"])
    out, err = capsys.readouterr()
    assert rc == 0, f"{where}: python -m cssl_ray.{cli} {shlex.join(argv)}\n{err}"
    assert out.startswith("dry run: ") and out.count("\n") == 1, out
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # wrote nothing
    ray = sys.modules.get("ray")
    assert ray is None or not ray.is_initialized()


def test_dry_run_reports_the_labelled_images_rule_in_one_line(fake_cache, monkeypatch, capsys):
    from cssl_ray.experiments import train

    monkeypatch.setenv("CSSL_RAY_CACHE", str(fake_cache))
    rc = train.main(["--config", str(REPO / "configs" / "nuclei.yaml"), "--workers", "4", "--address", "auto",
                     "--storage-path", "s3://YOUR-BUCKET/x", "--dry-run"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("cssl_ray.train: error: --workers: 4 ranks but only 3 labelled images")
    assert "\n" not in err


@pytest.mark.parametrize("cli", ["tune", "ablate"])
def test_labeller_flags_override_the_space(cli, fake_cache, monkeypatch, tmp_path, capsys):
    """--labellers / --gpus-per-labeller set a space's resources from the command line, checked in one line."""
    monkeypatch.setenv("CSSL_RAY_CACHE", str(fake_cache))
    main = importlib.import_module(f"cssl_ray.{cli}").main
    common = ["--space", str(REPO / "tune_spaces" / "nuclei.yaml"), "--storage-path", str(tmp_path), "--workers", "1",
              "--tracking-uri", f"sqlite:///{tmp_path}/m.db", "--dry-run", "--address", "auto"]  # GPUs: a cluster's
    if cli == "ablate":  # the space's grid holds bn_mix, which runs in-process only (issue 15)
        common += ["--cells", "supervised", "cssl"]
    assert main(common + ["--labellers", "3", "--gpus-per-labeller", "0.25"]) == 0
    assert "3 pseudo-labeller(s) x 0.25 GPU" in capsys.readouterr().out
    assert main(common + ["--labellers", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--labellers: 0 is out of range; allowed: >= 1" in err
    assert main(common + ["--gpus-per-labeller", "2"]) == 2
    assert "--gpus-per-labeller: 2 is out of range" in capsys.readouterr().err
