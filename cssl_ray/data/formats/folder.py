"""The generic ``folder`` format for any user data (e.g. a duodenum histology set).

    <root>/classes.yaml                 classes: [background, duodenum, ...]   (index = class id)
    <root>/images/<name>.<png|tif|tiff|jpg|jpeg>
    <root>/masks/<name>.png             integer class ids, one channel (L, P or 16-bit grey)
    <root>/unlabelled/<name>.<ext>      optional; mask None

Strict pairing, nothing silently dropped: every image in images/ needs its mask and every mask its
image; a name in both images/ and unlabelled/ is an error (the same picture labelled and
unlabelled would leak); a file with another extension is an error (hidden files are skipped).
Images keep their own dtype (TIFF via tifffile, so uint16 / float32 survive; others via Pillow,
palette images converted to RGB). Class ids >= len(classes) are an error naming the mask and id.
Samples: labelled ones first, then unlabelled, each in natural order; subset None.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tifffile
import yaml
from PIL import Image

from cssl_ray.data.formats import ReadReport, dataset_error, natural_key, read_pil, require_dir
from cssl_ray.data.sample import DatasetError, Sample

CLASSES: list[str] = []  # per dataset: read_classes(<root>/classes.yaml)
CLASSES_FILE = "classes.yaml"
IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg")


def summary_hint() -> str:
    return ("put images in <root>/images/<name>.<png|tif|tiff|jpg|jpeg>, their class-id masks in "
            "<root>/masks/<name>.png, optional unlabelled images in <root>/unlabelled/, and the class names in "
            "<root>/classes.yaml as 'classes: [background, ...]'")


def read_classes(path: Path) -> list[str]:
    """The ``classes`` list of a classes.yaml: at least two names, background first."""
    if not path.is_file():
        raise dataset_error(path, f"missing; it names the classes: {summary_hint()}")
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise dataset_error(path, "unreadable YAML", exc) from exc
    if not isinstance(data, dict) or "classes" not in data:
        raise dataset_error(path, "missing key 'classes' (e.g. 'classes: [background, duodenum]')")
    classes = data["classes"]
    if not isinstance(classes, list) or len(classes) < 2 or not all(isinstance(c, str) for c in classes):
        raise dataset_error(path, f"'classes' must be a list of at least two names, background first; got {classes!r}")
    return classes


def read(root: str | Path, report: ReadReport | None = None) -> Iterator[Sample]:
    """Labelled images with (H, W) uint8 masks, then unlabelled ones with mask None.

    ``report`` is accepted for a uniform API; this format has no documented absences."""
    root = require_dir(root, "folder dataset", summary_hint())
    classes = read_classes(root / CLASSES_FILE)
    images = _listing(root / "images", IMAGE_SUFFIXES)
    masks = _listing(root / "masks", (".png",))
    unlabelled = _listing(root / "unlabelled", IMAGE_SUFFIXES)
    if not images and not unlabelled:
        raise DatasetError(f"{root}: no images found (searched images/*.{{png,tif,tiff,jpg,jpeg}} and "
                           f"unlabelled/*); {summary_hint()}")
    for name, path in images.items():
        if name not in masks:
            raise dataset_error(path, f"image without a mask: expected {root / 'masks' / (name + '.png')}")
    for name, path in masks.items():
        if name not in images:
            raise dataset_error(path, f"mask without an image: expected {root / 'images' / name}.<png|tif|jpg>")
    for name, path in unlabelled.items():
        if name in images:
            raise dataset_error(path, f"also labelled as {images[name]}; an image is labelled or unlabelled, not both")
    items = [(n, images[n], masks[n]) for n in sorted(images, key=natural_key)]
    items += [(n, unlabelled[n], None) for n in sorted(unlabelled, key=natural_key)]
    return _load(items, classes)


def read_image(path: Path) -> np.ndarray:
    """Pixels in the file's own dtype: TIFF via tifffile, PNG / JPEG via Pillow."""
    if path.suffix.lower() in (".tif", ".tiff"):
        try:
            return tifffile.imread(path)
        except Exception as exc:  # noqa: BLE001 - tifffile raises TiffFileError, ValueError, OSError, ...
            raise dataset_error(path, "unreadable TIFF", exc) from exc
    try:
        with Image.open(path) as im:
            im.load()  # decode here so a truncated file raises inside the try
            return np.array(im.convert("RGB") if im.mode == "P" else im)  # palette images: colours, not indices
    except Exception as exc:  # noqa: BLE001 - Pillow raises OSError, SyntaxError, ValueError, ...
        raise dataset_error(path, "unreadable image", exc) from exc


def _listing(folder: Path, suffixes: tuple[str, ...]) -> dict[str, Path]:
    """name -> file of a flat folder (absent folder: empty); other extensions and duplicate names are errors."""
    if not folder.is_dir():
        return {}
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir(), key=lambda p: natural_key(p.name)):
        if path.name.startswith("."):
            continue
        if not path.is_file() or path.suffix.lower() not in suffixes:
            raise dataset_error(path, f"unexpected entry in {folder.name}/; allowed: *{', *'.join(suffixes)}")
        if path.stem in found:
            raise dataset_error(path, f"name {path.stem!r} used twice in {folder.name}/ (also {found[path.stem].name})")
        found[path.stem] = path
    return found


def _load(items: list[tuple[str, Path, Path | None]], classes: list[str]) -> Iterator[Sample]:
    for name, image_path, mask_path in items:
        image = read_image(image_path)
        if image.ndim not in (2, 3):
            raise dataset_error(image_path, f"expected an (H, W) or (H, W, C) image, got shape {image.shape}")
        mask = None
        if mask_path is not None:
            ids = read_pil(mask_path)  # P keeps palette indices = class ids; L / I;16 keep grey values
            if ids.ndim != 2:
                raise dataset_error(mask_path, f"mask must be one channel of class ids, got shape {ids.shape}")
            if ids.shape != image.shape[:2]:
                raise dataset_error(mask_path, f"mask {ids.shape} does not match image {image_path} {image.shape[:2]}")
            bad = ids[(ids < 0) | (ids >= len(classes))]
            if bad.size:
                raise dataset_error(mask_path, f"class id {int(bad.max())} out of range: {len(classes)} classes "
                                               f"{classes} allow 0..{len(classes) - 1}")
            mask = ids.astype(np.uint8)
        yield Sample(name=name, image=image, mask=mask, source=str(image_path))
