"""``nuclei_tiles``: the ``nuclei`` images at their native resolution, cut into non-overlapping tiles.

``nuclei`` (``nuclei.py``) resizes each 512-1024 px image to the training size (256x256), where a
micronucleus is ~2 px. This reader keeps the native pixels: it reads the same wheel through
``nuclei.read`` (same pairs, masks, subsets), normalises each SOURCE image as ``nuclei`` does (its
own 1st-99.8th percentile -> [0, 1], ``preprocess.percentile_normalise``; per source image, not per
tile, so a tile of background keeps its dark level instead of having its noise stretched), then cuts
it into ``tile`` x ``tile`` tiles on a grid from the top-left corner.

Borders: a grid cell that runs past the image's bottom or right edge is kept when at least
``min_cover`` (0.5) of its area is real image, padded to the full tile with 0 (the normalised dark
level) and mask 0 (background); cells with less real area are dropped, so those border strips are
not used (the 768x869 images lose their rightmost 101 columns at tile 256: 3x3 tiles). An image too
small for any cell to qualify keeps its top-left tile (padded) so that no source image vanishes.

Each tile is a row:

    image   float32 (tile, tile) in [0, 1], already normalised (the card says ``normalise: none``)
    mask    uint8 (tile, tile): 0 background, 1 nucleus, 2 micronucleus (as ``nuclei``)
    name    "<source name>/y<row>x<col>" (the tile's top-left pixel in the source image)
    group   the source image's name ("<subset>/<set>/<stem>"): ``labelled_by: group`` and
            ``data.val_count`` move whole source images, so a source image is never split across
            train / val / test nor across D_L / D_U
    subset  the source image's (train / val / test, from the wheel's folders)

Duplicate check: the store digests each tile's pixels; the test image that repeats a training image
(see ``nuclei``) repeats it tile for tile, so all its tiles are dropped from the test part.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from cssl_ray.data import nuclei
from cssl_ray.data.preprocess import percentile_normalise
from cssl_ray.data.sample import DatasetError, Sample

CLASSES = nuclei.CLASSES
TILE = 256  # measured choice (docs: datasets/nuclei_tiles.yaml)
MIN_COVER = 0.5  # a border tile needs at least this share of real pixels
LOW, HIGH = 1.0, 99.8  # nuclei's card: per-image percentiles mapped to 0 and 1


def summary_hint() -> str:
    return (f"the nuclei images ({nuclei.summary_hint()}) at native resolution, per-image percentile "
            f"normalised, cut into {TILE}x{TILE} tiles")


def tile_origins(height: int, width: int, tile: int = TILE, min_cover: float = MIN_COVER) -> list[tuple[int, int]]:
    """Top-left corners (y, x) of the kept grid cells of an ``height`` x ``width`` image, row by row:
    cells with at least ``min_cover`` of their area inside the image; (0, 0) alone if none is."""
    if tile < 1:
        raise DatasetError(f"nuclei_tiles: tile must be >= 1, got {tile}")
    kept = [(y, x) for y in range(0, height, tile) for x in range(0, width, tile)
            if min(tile, height - y) * min(tile, width - x) >= min_cover * tile * tile]
    return kept or [(0, 0)]


def cut(image: np.ndarray, mask: np.ndarray, y: int, x: int, tile: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``tile`` x ``tile`` cell at (y, x) of a normalised (H, W) image and its mask, zero-padded
    (mask 0 = background) where it runs past the image."""
    out_x = np.zeros((tile, tile), np.float32)
    out_y = np.zeros((tile, tile), np.uint8)
    part_x, part_y = image[y:y + tile, x:x + tile], mask[y:y + tile, x:x + tile]
    out_x[:part_x.shape[0], :part_x.shape[1]] = part_x
    out_y[:part_y.shape[0], :part_y.shape[1]] = part_y
    return out_x, out_y


def read(root: str | Path, report: Any = None, *, tile: int = TILE, min_cover: float = MIN_COVER) -> Iterator[Sample]:
    """Every kept tile of every ``nuclei`` pair (see the module docstring), in ``nuclei.read``'s
    order, tiles row by row. ``tile`` and ``min_cover`` are reader options (part of the cache key)."""
    tile = int(tile)
    if tile < 1 or not 0.0 < float(min_cover) <= 1.0:
        raise DatasetError(f"nuclei_tiles: need tile >= 1 and 0 < min_cover <= 1, got {tile}, {min_cover}")
    for sample in nuclei.read(root, report):
        yield from tiles_of(sample, tile, float(min_cover))


def tiles_of(sample: Sample, tile: int = TILE, min_cover: float = MIN_COVER) -> Iterator[Sample]:
    """The tiles of one ``nuclei`` sample (grey image, semantic mask)."""
    if sample.image.ndim != 2:
        raise DatasetError(f"{sample.source or sample.name}: nuclei_tiles expects a single-channel image, "
                           f"got shape {sample.image.shape}")
    image = percentile_normalise(sample.image, LOW, HIGH)
    mask = sample.mask if sample.mask is not None else np.zeros(image.shape, np.uint8)
    h, w = image.shape
    for y, x in tile_origins(h, w, tile, min_cover):
        tx, ty = cut(image, mask, y, x, tile)
        yield Sample(name=f"{sample.name}/y{y:04d}x{x:04d}", image=tx, mask=ty, group=sample.name,
                     subset=sample.subset, source=f"{sample.source} [tile y={y} x={x} size {tile}]")
