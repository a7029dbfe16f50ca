"""Batch inference (``cssl_ray.experiments.predict``) against an in-process forward pass; nothing is trained.

A tiny random model is saved as ``best.pt`` in the format ``cssl_ray.run.local`` writes. Both sides run
the same batch shapes on one thread, so the masks compare exactly (oneDNN convolutions may differ
in the last bit between batch sizes, which could flip an argmax tie).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cssl_ray.config import from_dict, to_dict
from cssl_ray.data.preprocess import resize_image, resize_mask, scale_to_unit, to_channels_first
from cssl_ray.evaluation.inference import PALETTE, overlay
from cssl_ray.experiments.predict import main
from cssl_ray.models import create_model
from cssl_ray.run import checkpoint as ckpt

CFG = from_dict({
    "data": {"name": "folder", "num_classes": 3, "image_size": [32, 32], "in_channels": 1},
    "model": {"base_channels": 4, "depth": 2, "embed_dim": 8, "proj_hidden": 8},
    "patches": {"size": 16, "min_pixels": 10},
})
SIZES = {"a": (40, 48), "b10": (32, 32), "c": (20, 30)}  # name -> (H, W): shrink, same, grow


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("predict")
    torch.manual_seed(0)
    model = create_model(CFG.model, CFG.data.in_channels, CFG.data.num_classes)
    ckpt.save_atomic({"model": model.state_dict(), "config": to_dict(CFG), "round": 0, "val": {}, "test": {}},
                     root / "best.pt")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(1)
    for i, (name, (h, w)) in enumerate(SIZES.items()):
        shape = (h, w, 3) if i == 0 else (h, w)  # one RGB file: the luma path to 1 channel
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(images / f"{name}.png")
    return {"root": root, "ckpt": root / "best.pt", "images": images}


@torch.no_grad()
def _expected(paths: dict[str, Path], batch_size: int) -> dict[str, np.ndarray]:
    """The oracle: folder card's ``scale`` + luma + resize, forward, argmax, nearest back to size."""
    saved = torch.load(paths["ckpt"], weights_only=False)
    cfg = from_dict(saved["config"])
    model = create_model(cfg.model, cfg.data.in_channels, cfg.data.num_classes).eval()
    model.load_state_dict(saved["model"])
    names = sorted(SIZES)
    x = [resize_image(to_channels_first(scale_to_unit(np.array(Image.open(paths["images"] / f"{n}.png"))), 1),
                      (32, 32)) for n in names]
    out = {}
    for s in range(0, len(names), batch_size):
        logits = model(torch.from_numpy(np.stack(x[s : s + batch_size])))  # (b, 3, 32, 32)
        for n, m in zip(names[s : s + batch_size], logits.argmax(1).numpy().astype(np.uint8)):
            out[n] = resize_mask(m, SIZES[n])
    return out


def _check_outputs(out: Path, expected: dict[str, np.ndarray]) -> None:
    for name, (h, w) in SIZES.items():
        mask = np.array(Image.open(out / f"{name}_mask.png"))
        assert mask.dtype == np.uint8 and mask.shape == (h, w)
        np.testing.assert_array_equal(mask, expected[name])
        over = Image.open(out / f"{name}_overlay.png")
        assert over.mode == "RGB" and over.size == (w, h)
    assert not list(out.glob(".*.tmp"))  # no temporary files left


def test_local_matches_forward_pass(setup, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["--checkpoint", str(setup["ckpt"]), "--images", str(setup["images"]), "--out", str(out),
                 "--local", "--batch-size", "2"]) == 0
    _check_outputs(out, _expected(setup, batch_size=2))
    assert '"images": 3' in capsys.readouterr().out


def test_ray_train_checkpoint_folder_uses_best_weights(setup, tmp_path):
    saved = torch.load(setup["ckpt"], weights_only=False)
    other = {k: torch.zeros_like(v) for k, v in saved["model"].items()}  # a different last-round model
    folder = tmp_path / "checkpoint_000003"
    folder.mkdir()
    torch.save({"model": other, "best_model": saved["model"], "config": saved["config"]}, folder / "state.pt")
    out = tmp_path / "out"
    assert main(["--checkpoint", str(folder), "--images", str(setup["images"]), "--out", str(out),
                 "--local", "--batch-size", "2"]) == 0
    _check_outputs(out, _expected(setup, batch_size=2))


@pytest.fixture(scope="module")
def ray_session():
    from conftest_ray import local_ray

    with local_ray(num_cpus=4):
        yield


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.data.context")
def test_ray_matches_forward_pass(setup, ray_session, tmp_path):
    out = tmp_path / "out"
    assert main(["--checkpoint", str(setup["ckpt"]), "--images", str(setup["images"]), "--out", str(out),
                 "--workers", "2", "--batch-size", "1"]) == 0
    _check_outputs(out, _expected(setup, batch_size=1))


def test_overlay_palette():
    display = np.full((2, 3, 3), 100, np.uint8)
    mask = np.array([[0, 1, 2], [0, 10, 0]], np.uint8)
    got = overlay(display, mask, alpha=0.5)
    np.testing.assert_array_equal(got[0, 0], [100, 100, 100])  # background: the image
    np.testing.assert_array_equal(got[0, 1], ((np.array(PALETTE[1]) + 100) / 2 + 0.5).astype(np.uint8))
    np.testing.assert_array_equal(got[1, 1], got[0, 1])  # id 10 wraps to the colour of id 1


def _error(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    from conftest_ray import own_lines

    lines = own_lines(capsys.readouterr().err)  # a module-scoped Ray may still forward its logs
    assert len(lines) == 1 and lines[0].startswith("cssl_ray.predict: error: "), lines
    return lines[0]


def test_errors_are_one_line(setup, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--images", str(setup["images"]), "--out", str(out), "--local"]
    missing = tmp_path / "nope.pt"
    assert str(missing) in _error(["--checkpoint", str(missing), *args], capsys)

    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": 1}, foreign)
    assert "not a cssl_ray checkpoint" in _error(["--checkpoint", str(foreign), *args], capsys)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file")
    assert str(garbage) in _error(["--checkpoint", str(garbage), *args], capsys)

    mismatched = tmp_path / "mismatched.pt"
    saved = torch.load(setup["ckpt"], weights_only=False)
    torch.save({**saved, "config": {**saved["config"], "data": {**saved["config"]["data"], "num_classes": 5}}},
               mismatched)
    assert "do not fit" in _error(["--checkpoint", str(mismatched), *args], capsys)

    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no images found" in _error(["--checkpoint", str(setup["ckpt"]), "--images", str(empty),
                                        "--out", str(out), "--local"], capsys)

    bad = tmp_path / "bad"
    bad.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(bad / "ok.png")
    (bad / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    err = _error(["--checkpoint", str(setup["ckpt"]), "--images", str(bad), "--out", str(out), "--local"], capsys)
    assert str(bad / "broken.png") in err
    assert not out.exists()  # nothing written for a run that failed on its input
    assert "--gpus-per-worker: -1 is out of range" in _error(
        ["--checkpoint", str(setup["ckpt"]), "--images", str(setup["images"]), "--out", str(out),
         "--gpus-per-worker", "-1"], capsys)


def test_dry_run_names_the_actors_gpus(setup, tmp_path, capsys):
    from cssl_ray.experiments.predict import main

    assert main(["--checkpoint", str(setup["ckpt"]), "--images", str(setup["images"]), "--out", str(tmp_path / "o"),
                 "--workers", "2", "--gpus-per-worker", "0.5", "--dry-run"]) == 0
    assert "on 2 Segmenter actor(s) x 0.5 GPU" in capsys.readouterr().out
