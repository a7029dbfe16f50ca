"""The nuclei_tiles reader on a tiny fake mnfinder wheel: tiles cover each source image exactly
(hand-computed grids at tile 4), group = source image, and the split never cuts a source image
(across train / val / test, or across D_L / D_U)."""
from __future__ import annotations

import numpy as np
import pytest
from fixtures_nuclei import WHEEL, fake_pairs, write_wheel

from cssl_ray.data import nuclei, nuclei_tiles
from cssl_ray.data.cards import load_card
from cssl_ray.data.prepare import prepare
from cssl_ray.data.preprocess import percentile_normalise
from cssl_ray.data.splits import split_dataset


def _pair(top: str, set_name: str, stem: str, shape: tuple[int, int], seed: int) -> dict:
    rng = np.random.default_rng(seed)
    image = rng.integers(100, 5000, shape).astype(np.uint16)
    nuc = (rng.random(shape) < 0.3).astype(np.uint8) * 255
    mn = (rng.random(shape) < 0.05).astype(np.uint8) * 255
    expected = np.where(mn > 0, 2, np.where(nuc > 0, 1, 0)).astype(np.uint8)
    subset = {"training-data": "train", "validation-data": "val", "test-data": "test"}[top]
    return {"top": top, "set": set_name, "stem": stem, "image": image, "nuc": (nuc, None), "mn": mn,
            "expected": expected, "name": f"{subset}/{set_name}/{stem}"}


def _pairs() -> list[dict]:
    """Six training images (8x8: 4 whole tiles; 6x7: the border case; 8x4, 4x4, 5x8, 4x12), one val
    and two test images, one of which repeats a training image pixel for pixel."""
    shapes = [(8, 8), (6, 7), (8, 4), (4, 4), (5, 8), (4, 12)]
    pairs = [_pair("training-data", "2022-03-18_RPE1" if i < 3 else "2023-05-31_misc", str(i), s, i)
             for i, s in enumerate(shapes)]
    pairs.append(_pair("validation-data", "2022-10-14_U2OS", "v", (8, 4), 10))
    pairs.append(_pair("test-data", "2023-05-31_misc", "t", (4, 8), 11))
    dup = dict(pairs[0], top="test-data", set="2023-05-31_misc", stem="dup", name="test/2023-05-31_misc/dup")
    pairs.append(dup)
    return pairs


@pytest.fixture
def wheel(tmp_path):
    path = tmp_path / WHEEL
    return path, write_wheel(path, _pairs())


def test_grid_origins_by_hand():
    # 6x7 at tile 4: cells (0,0) 16/16, (0,4) 4x3 = 12/16, (4,0) 2x4 = 8/16 kept; (4,4) 2x3 = 6/16 dropped
    assert nuclei_tiles.tile_origins(6, 7, 4) == [(0, 0), (0, 4), (4, 0)]
    assert nuclei_tiles.tile_origins(8, 8, 4) == [(0, 0), (0, 4), (4, 0), (4, 4)]
    assert nuclei_tiles.tile_origins(5, 5, 4) == [(0, 0)]  # the 1-px strips are 4/16 each
    assert nuclei_tiles.tile_origins(1, 2, 4) == [(0, 0)]  # smaller than half a tile: kept padded, never lost
    # the real sizes at 256: 768x869 -> 3x3 (the 101-column strip is 39% of a tile), 512 -> 2x2, 1024 -> 4x4
    assert [len(nuclei_tiles.tile_origins(h, w)) for h, w in ((768, 869), (512, 512), (1024, 1024))] == [9, 4, 16]


def test_tiles_cover_each_source_image_exactly(wheel):
    path, pairs = wheel
    tiles = list(nuclei_tiles.read(path, tile=4))
    sources = {p["name"]: p for p in pairs}
    order = [t.group for t in tiles]
    assert order == sorted(order, key=order.index)  # a source image's tiles come together
    assert {t.group for t in tiles} == set(sources)
    for name, p in sources.items():
        mine = [t for t in tiles if t.group == name]
        h, w = p["image"].shape
        norm = percentile_normalise(p["image"], 1.0, 99.8)
        image, mask = np.full((h + 4, w + 4), np.nan, np.float32), np.full((h + 4, w + 4), 255, np.uint8)
        for t in mine:
            y, x = (int(v) for v in t.name.rsplit("/", 1)[1][1:].split("x"))
            assert t.name == f"{name}/y{y:04d}x{x:04d}" and t.subset == name.split("/")[0]
            assert t.image.shape == t.mask.shape == (4, 4) and t.image.dtype == np.float32
            assert np.isnan(image[y:y + 4, x:x + 4]).all()  # no overlap
            image[y:y + 4, x:x + 4], mask[y:y + 4, x:x + 4] = t.image, t.mask
        covered = ~np.isnan(image[:h, :w])
        cells = nuclei_tiles.tile_origins(h, w, 4)
        want = np.zeros((h, w), bool)
        for y, x in cells:
            want[y:y + 4, x:x + 4] = True
        assert len(mine) == len(cells) and np.array_equal(covered, want)
        assert np.array_equal(image[:h, :w][covered], norm[covered])  # normalised per SOURCE image
        assert np.array_equal(mask[:h, :w][covered], p["expected"][covered])
        pad = ~np.isnan(image) & (np.pad(np.ones((h, w), bool), ((0, 4), (0, 4))) == 0)
        assert (image[pad] == 0).all() and (mask[pad] == 0).all()  # padding: dark, background
    # the 8x8 image is covered whole; the 6x7 one loses its bottom-right 2x3 corner only
    assert sum(t.group == "train/2022-03-18_RPE1/0" for t in tiles) == 4
    assert [t.name.rsplit("/", 1)[1] for t in tiles if t.group == "train/2022-03-18_RPE1/1"] == \
        ["y0000x0000", "y0000x0004", "y0004x0000"]


def test_card_and_store_group_tiles_by_source_image(tmp_path, wheel):
    path, _ = wheel
    card = load_card("nuclei_tiles")
    assert card.format == "nuclei_tiles" and list(card.classes) == nuclei.CLASSES == nuclei_tiles.CLASSES
    assert card.splits.labelled_by == "group" and card.normalise == "none"
    store = prepare("nuclei_tiles", path, options={"tile": 4}, cache=tmp_path / "c")
    index = store.index()
    assert store.num_rows == 4 + 3 + 2 + 1 + 2 + 3 + 2 + 2 + 4
    assert all(n.rsplit("/", 1)[0] == g for n, g in zip(index["name"], index["group"]))
    # the default tile (256) on these tiny images: one padded tile per source image
    whole = prepare("nuclei_tiles", path, cache=tmp_path / "c")
    assert whole.num_rows == 9 and whole.index()["height"] == [256] * 9


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_split_never_cuts_a_source_image(tmp_path, wheel, seed):
    path, _ = wheel
    index = prepare("nuclei_tiles", path, options={"tile": 4}, cache=tmp_path / "c").index()
    split, report = split_dataset(index["subset"], index["group"], index["has_mask"], labelled_fraction=0.1,
                                  labelled_count=2, labelled_by="group", seed=seed, digests=index["digest"],
                                  val_count=4)
    part_of: dict[str, set[str]] = {}
    for part in ("labelled", "unlabelled", "val", "test"):
        for i in getattr(split, part):
            part_of.setdefault(index["group"][i], set()).add(part)
    assert all(len(parts) == 1 for parts in part_of.values()), part_of
    labelled = {index["group"][i] for i in split.labelled}
    assert len(labelled) == 2 and all(g.startswith("train/") for g in labelled)
    val_groups = {index["group"][i] for i in split.val}  # the fixed val image + whole training images
    assert "val/2022-10-14_U2OS/v" in val_groups and len(val_groups) >= 2 and len(split.val) >= 4
    assert report.labelled_units == 6 - (len(val_groups) - 1)  # D_L is drawn from the images left
    assert {index["group"][i] for i in split.labelled + split.unlabelled} | val_groups >= \
        {f"train/{s}" for s in ("2022-03-18_RPE1/0", "2022-03-18_RPE1/1", "2022-03-18_RPE1/2")}
    # the test image that repeats training image 0 is dropped tile for tile; the other test image stays whole
    assert {index["name"][i].rsplit("/", 1)[0] for i in report.duplicates_dropped} == {"test/2023-05-31_misc/dup"}
    assert len(report.duplicates_dropped) == 4
    assert {index["group"][i] for i in split.test} == {"test/2023-05-31_misc/t"} and len(split.test) == 2


def test_the_standard_fake_wheel_reads_too(tmp_path):
    path = tmp_path / WHEEL
    write_wheel(path, fake_pairs())
    tiles = list(nuclei_tiles.read(path, tile=4))
    assert [t.name for t in tiles] == ["train/2022-03-18_RPE1/3/y0000x0000", "train/2022-03-18_RPE1/3/y0000x0004",
                                       "train/2022-03-18_RPE1/3/y0004x0000",
                                       "val/2023-05-31_misc/MAX_2022 ATF3.lif - BAY/y0000x0000",
                                       "test/2022-10-14_U2OS/4/y0000x0000"]
    assert tiles[0].mask[2, 2] == 2 and tiles[1].mask[0, 2] == 2  # micronuclei kept (x 6 -> tile x 4, col 2)
