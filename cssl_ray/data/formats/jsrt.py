"""JSRT chest X-rays with the SCR (Segmentation in Chest Radiographs) lung / heart / clavicle masks.

Layout, searched recursively:

    All247images/JPCLN001..154.IMG, JPCNN001..093.IMG
    scratch/fold{1,2}/masks/{left lung,right lung,heart,left clavicle,right clavicle}/<name>.gif

image  headerless raw, ``size`` x ``size`` big-endian uint16 holding 12-bit values; the real files
       are 2048 x 2048 (8,388,608 bytes, checked: a truncated file is an error). ``size`` exists
       so tests can use small files. Returned as native-endian uint16 with the raw values: JSRT is
       stored WHITE-IS-ZERO (display ``1 - raw / 4096``); inverting and scaling is preprocessing.
mask   SCR GIFs are binary 0/255 at half resolution (1024 for 2048 images); each fold holds half
       the images, so both are searched. Left/right are the patient's. By default the masks are
       upsampled to the image with nearest neighbour (each pixel repeated 2 x 2); with
       ``half=True`` the image is instead reduced to the masks' resolution by 2 x 2 block mean
       (rounded, still uint16), which is 4x lighter and loses no label detail.
       Paint order: lungs (1), heart (2), clavicles (3) last, since they overlap the lungs.
       An image with no SCR mask at all gets mask None; one with only some of the 5 is an error.
"""
from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from cssl_ray.data.formats import ReadReport, dataset_error, natural_key, read_pil, require_dir, visible_files
from cssl_ray.data.sample import DatasetError, Sample

CLASSES = ["background", "lung", "heart", "clavicle"]
IMAGE_SIZE = 2048
# SCR mask folder -> class id, in paint order (later entries cover earlier ones).
ORGANS = {"left lung": 1, "right lung": 1, "heart": 2, "left clavicle": 3, "right clavicle": 3}
_NAME = re.compile(r"JPC(LN|NN)\d+\.IMG", re.IGNORECASE)


def summary_hint() -> str:
    return ("download the 247 JSRT images (All247images.zip) from http://db.jsrt.or.jp/eng.php and the SCR masks "
            "from https://www.isi.uu.nl/Research/Databases/SCR/, unzip both under the root so that "
            "All247images/JPCLN001.IMG and scratch/fold1/masks/left lung/JPCLN001.gif exist; "
            "configs/nuclei.yaml (the nuclei set) runs with no download")


def read(root: str | Path, report: ReadReport | None = None, size: int = IMAGE_SIZE,
         half: bool = False) -> Iterator[Sample]:
    """Every JSRT image under ``root`` with its SCR mask: image (H, W) uint16, mask (H, W) uint8.

    ``report`` is accepted for a uniform API; JSRT has no documented absences to count."""
    if size <= 0 or size % 2:
        raise DatasetError(f"jsrt: size must be a positive even number of pixels (real files: 2048), got {size}")
    root = require_dir(root, "JSRT", summary_hint())
    images: dict[str, Path] = {}
    for p in visible_files(root, (".img",)):
        if not _NAME.fullmatch(p.name):
            continue
        if p.stem in images:
            raise dataset_error(p, f"{p.stem} found twice (also {images[p.stem]}); keep one copy")
        images[p.stem] = p
    if not images:
        raise DatasetError(f"{root}: no JSRT images found (searched **/JPCLN*.IMG, **/JPCNN*.IMG); {summary_hint()}")
    masks = _scr_masks(root)
    for name, organs in masks.items():
        if name not in images:
            raise dataset_error(next(iter(organs.values())), f"SCR mask without a JSRT image: no {name}.IMG under {root}")
        missing = [organ for organ in ORGANS if organ not in organs]
        if missing:
            folder = next(iter(organs.values())).parent.parent
            raise dataset_error(folder / missing[0] / f"{name}.gif",
                                f"missing, but {name} has other SCR masks (needs all of: {', '.join(ORGANS)})")
    names = sorted(images, key=natural_key)
    return _load([(images[n], masks.get(n)) for n in names], size, half)


def read_raw(path: Path, size: int = IMAGE_SIZE) -> np.ndarray:
    """(size, size) native uint16 raw values of one JSRT .IMG file; a wrong byte count is an error."""
    expected = size * size * 2
    try:
        actual = path.stat().st_size
        if actual != expected:
            raise dataset_error(path, f"{actual} bytes, expected {expected} ({size}x{size} big-endian uint16); "
                                      f"truncated or not a JSRT image")
        return np.fromfile(path, dtype=">u2").reshape(size, size).astype(np.uint16)
    except OSError as exc:
        raise dataset_error(path, "unreadable raw image", exc) from exc


def _scr_masks(root: Path) -> dict[str, dict[str, Path]]:
    """name -> {organ folder: gif} over both folds."""
    masks: dict[str, dict[str, Path]] = {}
    for gif in visible_files(root, (".gif",)):
        organ = gif.parent.name
        if organ not in ORGANS or gif.parent.parent.name != "masks":
            continue
        per_image = masks.setdefault(gif.stem, {})
        if organ in per_image:
            raise dataset_error(gif, f"{gif.stem} {organ} mask found twice (also {per_image[organ]}); keep one copy")
        per_image[organ] = gif
    return masks


def _halve(image: np.ndarray) -> np.ndarray:
    """(S, S) uint16 -> (S/2, S/2) uint16 rounded mean of each 2 x 2 block."""
    s = image.shape[0]
    blocks = image.reshape(s // 2, 2, s // 2, 2).astype(np.uint32).sum(axis=(1, 3))
    return ((blocks + 2) // 4).astype(np.uint16)


def _load(items: list[tuple[Path, dict[str, Path] | None]], size: int, half: bool) -> Iterator[Sample]:
    for path, organs in items:
        image = read_raw(path, size)  # (size, size)
        mask = None
        if organs is not None:
            mask = np.zeros((size // 2, size // 2), dtype=np.uint8)
            for organ, class_id in ORGANS.items():
                binary = read_pil(organs[organ], "L")
                if binary.shape != mask.shape:
                    raise dataset_error(organs[organ], f"mask {binary.shape} is not half the size of {path} "
                                                       f"{image.shape}; SCR masks are half resolution")
                mask[binary > 0] = class_id
            if not half:
                mask = mask.repeat(2, axis=0).repeat(2, axis=1)  # (size, size) nearest neighbour
        if half:
            image = _halve(image)
        yield Sample(name=path.stem, image=image, mask=mask, source=str(path))
