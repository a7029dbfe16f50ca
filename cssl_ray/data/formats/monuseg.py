"""MoNuSeg 2018 (H&E nuclei): RGB TIFF tiles with Aperio ImageScope XML nucleus outlines.

Layout, searched recursively (the zips unpack with a doubled top folder; names hold spaces):

    MoNuSeg 2018 Training Data/Tissue Images/<TCGA-id>.tif + .../Annotations/<TCGA-id>.xml   "train"
    MoNuSegTestData/<TCGA-id>.tif and <TCGA-id>.xml side by side                              "test"

Image and XML pair by stem; a stem without its partner, or found twice, is an error. ``subset`` is
"test" / "train" from the first folder named ``MoNuSeg*Test*`` / ``MoNuSeg*Train*`` on the way
(the root's own name included), else None. ``group`` is the TCGA patient barcode
("TCGA-18-5592"), so a split never cuts a patient.

Mask: each ``<Region>`` of ``<Regions>`` (other children, such as the leading
``<RegionAttributeHeaders>``, are skipped) is a polygon of ``<Vertex X= Y=>`` float pixel
coordinates, X = column, Y = row, clipped to the image. Polygons are filled on an instance map with
id = region index + 1 (index over the ``<Region>`` elements in file order; a later region paints
over an earlier one), with Pillow's rasteriser (a pixel is inside when its centre lies inside or
on the outline). The semantic mask is instances > 0: 0 background, 1 nucleus. Regions with fewer
than 3 vertices are skipped and counted in the ReadReport as "short region".
"""
from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image, ImageDraw

from cssl_ray.data.formats import ReadReport, dataset_error, natural_key, require_dir, visible_files
from cssl_ray.data.sample import DatasetError, Sample

CLASSES = ["background", "nucleus"]
_IMAGE_SUFFIXES = (".tif", ".tiff")


def summary_hint() -> str:
    return ("download 'MoNuSeg 2018 Training Data.zip' and 'MoNuSegTestData.zip' from "
            "https://monuseg.grand-challenge.org/Data/ and unzip both anywhere under the root "
            "(searched recursively for <id>.tif with its <id>.xml); configs/nuclei.yaml (the nuclei set) runs with no download")


def read(root: str | Path, report: ReadReport | None = None) -> Iterator[Sample]:
    """Every annotated MoNuSeg tile under ``root``: image (H, W, 3) uint8, mask (H, W) uint8."""
    root = require_dir(root, "MoNuSeg", summary_hint())
    images = _by_stem(visible_files(root, _IMAGE_SUFFIXES))
    xmls = _by_stem(visible_files(root, (".xml",)))
    if not images:
        raise DatasetError(f"{root}: no MoNuSeg images found (searched **/*.tif, **/*.tiff); {summary_hint()}")
    for stem, xml in xmls.items():
        if stem not in images:
            raise dataset_error(xml, f"annotation without an image: no {stem}.tif under {root}")
    for stem, image in images.items():
        if stem not in xmls:
            raise dataset_error(image, f"image without an annotation: no {stem}.xml under {root}")
    pairs = [(stem, images[stem], xmls[stem]) for stem in sorted(images, key=natural_key)]
    return _load(root, pairs, report)


def instance_map(xml_path: Path, shape: tuple[int, int], report: ReadReport | None = None) -> np.ndarray:
    """(H, W) int32: 0 background, region index + 1 inside each ``<Region>`` polygon."""
    h, w = shape
    canvas = Image.new("I", (w, h), 0)  # 32-bit: a tile holds more than 255 nuclei
    draw = ImageDraw.Draw(canvas)
    for index, region in enumerate(_regions(xml_path)):
        vertices = region.findall("./Vertices/Vertex")
        if len(vertices) < 3:
            if report is not None:
                report.note("short region", xml_path,
                            f"region {region.get('Id', index + 1)} has {len(vertices)} vertices, skipped")
            continue
        try:
            xy = np.array([(float(v.get("X")), float(v.get("Y"))) for v in vertices])  # (V, 2) column, row
        except (TypeError, ValueError) as exc:
            raise dataset_error(xml_path, f"region {region.get('Id', index + 1)}: vertex without numeric X/Y",
                                exc) from exc
        xy[:, 0] = xy[:, 0].clip(0, w - 1)
        xy[:, 1] = xy[:, 1].clip(0, h - 1)
        draw.polygon([tuple(p) for p in xy.tolist()], fill=index + 1)
    return np.array(canvas, dtype=np.int32)


def _regions(xml_path: Path) -> list[ET.Element]:
    try:
        tree = ET.parse(xml_path)
    except (ET.ParseError, OSError) as exc:
        raise dataset_error(xml_path, "unreadable ImageScope XML", exc) from exc
    return [child for regions in tree.getroot().iter("Regions") for child in regions if child.tag == "Region"]


def _load(root: Path, pairs: list[tuple[str, Path, Path]], report: ReadReport | None) -> Iterator[Sample]:
    for stem, image_path, xml_path in pairs:
        try:
            image = tifffile.imread(image_path)
        except Exception as exc:  # noqa: BLE001 - tifffile raises TiffFileError, ValueError, OSError, ...
            raise dataset_error(image_path, "unreadable TIFF", exc) from exc
        if image.ndim != 3 or image.shape[-1] < 3:
            raise dataset_error(image_path, f"expected an RGB(A) image (H, W, 3|4), got shape {image.shape}")
        image = image[..., :3]  # some tiles carry an alpha channel
        mask = (instance_map(xml_path, image.shape[:2], report) > 0).astype(np.uint8)
        yield Sample(name=stem, image=image, mask=mask, group=_patient(stem),
                     subset=_subset(root, image_path), source=str(image_path))


def _by_stem(paths: list[Path]) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for p in paths:
        if p.stem in found:
            raise dataset_error(p, f"{p.stem!r} found twice (also {found[p.stem]}); keep one copy")
        found[p.stem] = p
    return found


def _subset(root: Path, path: Path) -> str | None:
    for part in (root.name, *path.relative_to(root).parent.parts):
        name = part.lower()
        if name.startswith("monuseg"):
            if "test" in name:
                return "test"
            if "train" in name:
                return "train"
    return None


def _patient(stem: str) -> str:
    match = re.match(r"TCGA-[^-]+-[^-]+", stem)
    return match.group(0) if match else stem
