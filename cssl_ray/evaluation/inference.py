"""Batch inference without Ray or MLflow: a folder's images read and preprocessed as the training store
did (``Prepared``), the model step that turns them into class masks (``Segmenter``, a Ray Data actor
in ``cssl_ray.experiments.predict`` or called directly), and the mask and colour-overlay PNGs.
"""
from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cssl_ray.config import Config, to_dict

Batch = dict[str, np.ndarray]

# Class id -> RGB; background (0) stays the image. Ids past the list wrap around (1 + (c - 1) % 9).
PALETTE: tuple[tuple[int, int, int], ...] = (
    (0, 0, 0),  # background: not drawn
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60),
)
OVERLAY_ALPHA = 0.5  # weight of a class colour over the image


class PredictError(ValueError):
    """Bad input to ``cssl_ray.experiments.predict``; the message is one line naming the file."""


@dataclass
class Prepared:
    """One input image: its name, the network input and what the outputs are drawn on."""

    name: str  # file stem: outputs are <name>_mask.png, <name>_overlay.png
    image: np.ndarray  # (C, H, W) float32 at data.image_size, as the network saw in training
    display: np.ndarray  # (H0, W0, 3) uint8 at the file's own size, for the overlay


# ---------------------------------------------------------------------------------------------
# Inputs


def list_images(folder: str | Path) -> list[Path]:
    """Image files of a flat folder (png, tif, tiff, jpg, jpeg), natural order; errors name the file."""
    from cssl_ray.data.formats import folder as folder_format
    from cssl_ray.data.sample import DatasetError

    root = Path(folder)
    if not root.is_dir():
        raise PredictError(f"{root}: no such folder of images")
    try:
        # The folder format's rules: other extensions and a name used twice are errors, hidden files skipped.
        found = folder_format._listing(root, folder_format.IMAGE_SUFFIXES)
    except DatasetError as e:
        raise PredictError(str(e)) from None
    if not found:
        raise PredictError(f"{root}: no images found (*.{{png,tif,tiff,jpg,jpeg}})")
    return list(found.values())


def prepare_images(paths: list[Path], cfg: Config) -> list[Prepared]:
    """Read and preprocess every image as the training store did (``data.preprocess``)."""
    from cssl_ray.data.cards import CardError, load_card
    from cssl_ray.data.formats.folder import read_image
    from cssl_ray.data.preprocess import normalise, resize_image, to_channels_first
    from cssl_ray.data.sample import DatasetError

    d = cfg.data
    try:
        card = load_card(d.name)
    except CardError as e:
        raise PredictError(f"checkpoint data.name {d.name!r}: {e}") from None
    pre = card.preprocessing(tuple(d.image_size), d.in_channels, d.normalise)
    out = []
    for path in paths:
        try:
            raw = read_image(path)
        except DatasetError as e:
            raise PredictError(str(e)) from None
        if raw.ndim not in (2, 3) or min(raw.shape[:2]) < 1:
            raise PredictError(f"{path}: expected an (H, W) or (H, W, C) image, got shape {raw.shape}")
        try:
            x = to_channels_first(normalise(raw, pre), pre.channels)  # (C, H0, W0) float32
        except ValueError as e:
            raise PredictError(f"{path}: {e}") from None
        out.append(Prepared(path.stem, resize_image(x, pre.size), _display(x)))
    return out


def _display(x: np.ndarray) -> np.ndarray:
    """(C, H, W) normalised float -> (H, W, 3) uint8, min-max stretched (``none`` leaves any range)."""
    lo, hi = float(x.min()), float(x.max())
    unit = (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)
    rgb = unit if unit.shape[0] == 3 else np.repeat(unit[:1], 3, axis=0)
    return np.ascontiguousarray((rgb.transpose(1, 2, 0) * 255.0 + 0.5).astype(np.uint8))


# ---------------------------------------------------------------------------------------------
# The model step (a Ray Data actor, or called directly: predict --local)


class Segmenter:
    """``map_batches`` actor: ``{name, image (B, C, H, W)}`` -> ``{name, mask (B, H, W) uint8}`` (argmax)."""

    def __init__(self, config: Mapping[str, Any], state_dict: Mapping[str, Any], threads: int = 1,
                 device: str | None = None) -> None:
        import torch

        from cssl_ray.config import from_dict
        from cssl_ray.models import create_model

        # One intra-op thread per CPU held (as pipeline.PseudoLabeller): small convolutions lose more
        # to thread contention than they gain.
        torch.set_num_threads(threads)
        self.cfg = from_dict(dict(config))
        d = self.cfg.data
        self.device = torch.device(device or ("cuda" if _actor_gpus() else "cpu"))  # None: the actor's GPU
        self.model = create_model(self.cfg.model, d.in_channels, d.num_classes)
        self.model.load_state_dict(dict(state_dict))
        self.model.to(self.device).eval()

    def __call__(self, batch: Batch) -> Batch:
        import torch

        images = torch.from_numpy(np.array(batch["image"], dtype=np.float32)).to(self.device)  # (B, C, H, W)
        with torch.no_grad():
            logits = self.model(images)  # (B, K, H, W)
        masks = logits.argmax(dim=1).to(torch.uint8).cpu().numpy()  # (B, H, W); class ids < 256 (checked)
        return {"name": np.asarray(batch["name"]), "mask": masks}


def _actor_gpus() -> bool:
    """True inside a Ray actor that holds a GPU (ray.get_gpu_ids); False without Ray."""
    ray = sys.modules.get("ray")  # --local never imports Ray (~1 s)
    return ray is not None and ray.is_initialized() and bool(ray.get_gpu_ids())


def segment_local(items: list[Prepared], cfg: Config, state: dict[str, Any], batch_size: int) -> dict[str, np.ndarray]:
    """name -> mask (H, W) uint8 at the training size, in this process."""
    import torch

    seg = Segmenter(to_dict(cfg), state, threads=torch.get_num_threads(),
                    device="cuda" if torch.cuda.is_available() else "cpu")
    masks: dict[str, np.ndarray] = {}
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        out = seg({"name": np.array([p.name for p in chunk]), "image": np.stack([p.image for p in chunk])})
        masks.update(zip(out["name"].tolist(), out["mask"]))
    return masks


# ---------------------------------------------------------------------------------------------
# Outputs


def overlay(display: np.ndarray, mask: np.ndarray, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """(H, W, 3) uint8 image with each non-background class blended in its PALETTE colour."""
    if display.shape[:2] != mask.shape:
        raise ValueError(f"overlay: image {display.shape[:2]} and mask {mask.shape} differ in size")
    ids = mask.astype(np.int64)
    palette = np.asarray(PALETTE, dtype=np.float32)
    colours = palette[np.where(ids > 0, 1 + (ids - 1) % (len(PALETTE) - 1), 0)]  # (H, W, 3)
    a = np.where(ids > 0, alpha, 0.0)[..., None].astype(np.float32)  # (H, W, 1)
    return (display.astype(np.float32) * (1 - a) + colours * a + 0.5).astype(np.uint8)


def write_png(array: np.ndarray, path: Path) -> None:
    """Save a uint8 (H, W) or (H, W, 3) PNG under a temporary name, then rename: never half a file."""
    from PIL import Image

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            Image.fromarray(array).save(f, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_outputs(items: list[Prepared], masks: dict[str, np.ndarray], out: Path) -> None:
    """<out>/<name>_mask.png (class ids at the image's own size) and <name>_overlay.png per image."""
    from cssl_ray.data.preprocess import resize_mask

    out.mkdir(parents=True, exist_ok=True)
    for p in items:
        mask = resize_mask(masks[p.name], p.display.shape[:2])  # nearest neighbour: ids stay ids
        write_png(mask, out / f"{p.name}_mask.png")
        write_png(overlay(p.display, mask), out / f"{p.name}_overlay.png")
