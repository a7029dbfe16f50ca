"""IDRiD (Indian Diabetic Retinopathy Image Dataset), part A: fundus lesion segmentation.

Layout, the ``1. Original Images`` folder of part A found recursively (names hold dots and spaces;
parts B and C, which have such a folder too, are not read):

    A. Segmentation/1. Original Images/{a. Training Set,b. Testing Set}/IDRiD_XX.jpg
    A. Segmentation/2. All Segmentation Groundtruths/{a. Training Set,b. Testing Set}/
        {1. Microaneurysms,2. Haemorrhages,3. Hard Exudates,4. Soft Exudates,5. Optic Disc}/IDRiD_XX_{MA,HE,EX,SE,OD}.tif

image  RGB JPEG, (2848, 4288, 3) uint8 for the real data; subset "train" / "test" from the folder
lesion RGB TIFF with lesion pixels red: ``channel 0 > 0``. A missing lesion file means that lesion
       is absent (all zero): normal (e.g. soft exudates are missing for many images), counted in
       the ReadReport as "absent lesion", one note per file. A ground-truth file with no image is
       an error.

Lesions overlap, and the paper's metric is the area under the precision-recall curve *per lesion*,
so the faithful target is the (K, H, W) bool stack from ``read_multilabel`` (K in class-id order:
MA, HE, EX, SE, then OD with ``optic_disc=True``). ``read`` flattens it to one semantic mask with
this paint order, later covering earlier: OD, SE, EX, HE, MA -- large structures first, so the
small and rare lesions (microaneurysms) are never hidden. The optic disc (class 5) is only read
with ``optic_disc=True``; by default it is background.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from cssl_ray.data.formats import ReadReport, dataset_error, read_pil, require_dir, visible_files
from cssl_ray.data.sample import DatasetError, Sample

CLASSES = ["background", "microaneurysm", "haemorrhage", "hard exudate", "soft exudate"]
OPTIC_DISC = "optic disc"
# (file code, ground-truth folder); position + 1 = class id.
LESIONS = (("MA", "1. Microaneurysms"), ("HE", "2. Haemorrhages"), ("EX", "3. Hard Exudates"),
           ("SE", "4. Soft Exudates"), ("OD", "5. Optic Disc"))
PAINT_ORDER = (5, 4, 3, 2, 1)  # class ids, later covers earlier
SPLITS = {"a. Training Set": "train", "b. Testing Set": "test"}
SEGMENTATION_DIR = "A. Segmentation"
IMAGES_DIR = "1. Original Images"
TRUTH_DIR = "2. All Segmentation Groundtruths"


def summary_hint() -> str:
    return ("download 'A. Segmentation.zip' from "
            "https://ieee-dataport.org/open-access/indian-diabetic-retinopathy-image-dataset-idrid and unzip under "
            "the root so that 'A. Segmentation/1. Original Images/a. Training Set/IDRiD_01.jpg' exists; "
            "configs/nuclei.yaml (the nuclei set) runs with no download")


def class_names(optic_disc: bool = False) -> list[str]:
    return CLASSES + [OPTIC_DISC] if optic_disc else list(CLASSES)


def read(root: str | Path, report: ReadReport | None = None, optic_disc: bool = False) -> Iterator[Sample]:
    """Every IDRiD segmentation image: image (H, W, 3) uint8, mask (H, W) uint8 in ``PAINT_ORDER``."""
    return (sample for sample, _ in read_multilabel(root, report, optic_disc))


def read_multilabel(root: str | Path, report: ReadReport | None = None,
                    optic_disc: bool = False) -> Iterator[tuple[Sample, np.ndarray]]:
    """Like ``read``, with each sample's (K, H, W) bool lesion stack (K = 4, or 5 with the optic disc)."""
    lesions = LESIONS if optic_disc else LESIONS[:4]
    root = require_dir(root, "IDRiD", summary_hint())
    # Parts B (disease grading) and C (localisation) have a "1. Original Images" folder too.
    found = [p for p in root.rglob(IMAGES_DIR)
             if p.is_dir() and (p.parent.name == SEGMENTATION_DIR or (p.parent / TRUTH_DIR).is_dir())]
    if len(found) > 1:
        raise dataset_error(found[1], f"second {IMAGES_DIR!r} folder (also {found[0]}); keep one copy")
    if not found:
        raise DatasetError(f"IDRiD not found under {root} (no '{SEGMENTATION_DIR}/{IMAGES_DIR}' folder): "
                           f"{summary_hint()}")
    images_dir = found[0]
    truth_dir = images_dir.parent / TRUTH_DIR
    if not truth_dir.is_dir():
        raise dataset_error(truth_dir, "missing: the lesion masks live here (unzip all of 'A. Segmentation')")
    items = []  # (image, subset, [lesion tif per lesion])
    for split_dir in sorted(p for p in images_dir.iterdir() if not p.name.startswith(".")):
        if split_dir.name not in SPLITS:
            raise dataset_error(split_dir, f"unexpected entry; allowed: {', '.join(SPLITS)}")
        images = visible_files(split_dir, (".jpg", ".jpeg"))
        stems = {p.stem for p in images}
        for code, folder in lesions:
            lesion_dir = truth_dir / split_dir.name / folder
            if not lesion_dir.is_dir():
                raise dataset_error(lesion_dir, "missing lesion folder")
            expected = {f"{stem}_{code}.tif" for stem in stems}
            for path in sorted(lesion_dir.iterdir()):
                if not path.name.startswith(".") and path.name not in expected:
                    raise dataset_error(path, f"lesion mask without an image: expected <image>_{code}.tif "
                                              f"for an image in {split_dir}")
        for image in images:
            tifs = [truth_dir / split_dir.name / folder / f"{image.stem}_{code}.tif" for code, folder in lesions]
            items.append((image, SPLITS[split_dir.name], tifs))
    if not items:
        raise DatasetError(f"{images_dir}: no IDRiD images found (searched {'|'.join(SPLITS)}/*.jpg); {summary_hint()}")
    return _load(items, report)


def _load(items: list[tuple[Path, str, list[Path]]], report: ReadReport | None) -> Iterator[tuple[Sample, np.ndarray]]:
    for image_path, subset, tifs in items:
        image = read_pil(image_path, "RGB")  # (H, W, 3) uint8
        stack = np.zeros((len(tifs), *image.shape[:2]), dtype=bool)  # (K, H, W)
        for k, tif in enumerate(tifs):
            if not tif.is_file():
                if report is not None:
                    report.note("absent lesion", tif, "missing: lesion absent, all zero")
                continue
            red = read_pil(tif, "RGB")[..., 0]
            if red.shape != image.shape[:2]:
                raise dataset_error(tif, f"lesion mask {red.shape} does not match its image {image_path} "
                                         f"{image.shape[:2]}")
            stack[k] = red > 0
        mask = np.zeros(image.shape[:2], dtype=np.uint8)
        for class_id in PAINT_ORDER:
            if class_id <= len(tifs):
                mask[stack[class_id - 1]] = class_id
        sample = Sample(name=image_path.stem, image=image, mask=mask, subset=subset, source=str(image_path))
        yield sample, stack
