"""Dataset readers on tiny fixtures written in the exact on-disk formats (fixtures_formats.py).

Expected masks are built independently of the readers: hand-written arrays, explicit loops and a
naive point-in-polygon test.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fixtures_formats import (
    truncate,
    write_dicom,
    write_gif,
    write_imagescope_xml,
    write_jpeg,
    write_jsrt_raw,
    write_png,
    write_red_tiff,
    write_tiff,
)

from cssl_ray.data.formats import (
    CLASSES,
    READERS,
    ReadReport,
    chaos,
    class_names,
    folder,
    get_reader,
    idrid,
    jsrt,
    monuseg,
    natural_key,
    summary_hint,
)
from cssl_ray.data.sample import DatasetError


def raises_one_line(*fragments: str):
    """Context manager: a DatasetError whose one-line message holds every fragment."""

    class _Check:
        def __enter__(self):
            self._ctx = pytest.raises(DatasetError)
            self.info = self._ctx.__enter__()
            return self.info

        def __exit__(self, *exc):
            suppressed = self._ctx.__exit__(*exc)
            message = str(self.info.value)
            assert "\n" not in message, message
            for fragment in fragments:
                assert str(fragment) in message, (fragment, message)
            return suppressed

    return _Check()


def test_natural_key_orders_numbers_as_numbers():
    assert sorted(["IMG-10", "img-2", "IMG-1"], key=natural_key) == ["IMG-1", "img-2", "IMG-10"]


def test_registry_and_unknown_format():
    assert set(READERS) == {"monuseg", "chaos", "jsrt", "idrid", "folder"}
    assert get_reader("jsrt") is jsrt.read
    assert CLASSES["chaos"][0] == "background" and CLASSES["jsrt"] == ["background", "lung", "heart", "clavicle"]
    assert class_names("idrid", optic_disc=True)[-1] == "optic disc"
    with raises_one_line("'nope'", "monuseg", "folder"):
        get_reader("nope")
    for name in READERS:
        hint = summary_hint(name)
        assert hint and "\n" not in hint


@pytest.mark.parametrize("name", ["monuseg", "chaos", "jsrt", "idrid", "folder"])
def test_missing_root_names_folder_and_hint(tmp_path, name):
    missing = tmp_path / "nowhere"
    with raises_one_line(str(missing), summary_hint(name)):
        READERS[name](missing)


@pytest.mark.parametrize("name", ["monuseg", "chaos", "jsrt", "idrid"])
def test_empty_root_names_folder_and_pattern(tmp_path, name):
    with raises_one_line(str(tmp_path), "no ", "found"):
        READERS[name](tmp_path)


# --- MoNuSeg -------------------------------------------------------------------------------------

def inside(polygon: list[tuple[float, float]], x: float, y: float) -> bool:
    """Naive test for a convex polygon: (x, y) is inside or on the outline when it is on the same
    side of (or on) every edge."""
    signs = []
    for (x0, y0), (x1, y1) in zip(polygon, polygon[1:] + polygon[:1]):
        cross = (x1 - x0) * (y - y0) - (y1 - y0) * (x - x0)
        if cross:
            signs.append(cross > 0)
    return len(set(signs)) <= 1


def rasterise(polygons: list[list[tuple[float, float]]], h: int, w: int) -> np.ndarray:
    out = np.zeros((h, w), dtype=np.int32)
    for poly_id, polygon in polygons:
        for r in range(h):
            for c in range(w):
                if inside(polygon, c, r):  # vertex X = column, Y = row
                    out[r, c] = poly_id
    return out


H, W = 12, 10
SQUARE = [(1.0, 2.0), (4.0, 2.0), (4.0, 5.0), (1.0, 5.0)]
TRIANGLE = [(6.0, 6.0), (9.0, 6.0), (6.0, 9.0)]
TWO_VERTICES = [(3.0, 3.0), (5.0, 5.0)]
OUTSIDE = [(-3.0, 9.0), (2.0, 9.0), (2.0, 20.0), (-3.0, 20.0)]  # runs off the left and bottom edges
OUTSIDE_CLIPPED = [(0.0, 9.0), (2.0, 9.0), (2.0, 11.0), (0.0, 11.0)]


def write_monuseg_pair(image_path: Path, xml_path: Path, seed: int = 0) -> np.ndarray:
    rgba = np.random.default_rng(seed).integers(0, 256, (H, W, 4), dtype=np.uint8)
    write_tiff(image_path, rgba)
    write_imagescope_xml(xml_path, [SQUARE, TRIANGLE, TWO_VERTICES, OUTSIDE])
    return rgba


def test_monuseg_train_layout_doubled_folder_spaces_polygons(tmp_path):
    top = tmp_path / "MoNuSeg 2018 Training Data" / "MoNuSeg 2018 Training Data"
    stem = "TCGA-18-5592-01Z-00-DX1"
    rgba = write_monuseg_pair(top / "Tissue Images" / f"{stem}.tif", top / "Annotations" / f"{stem}.xml")
    report = ReadReport()
    [sample] = list(monuseg.read(tmp_path, report=report))

    expected_instances = rasterise([(1, SQUARE), (2, TRIANGLE), (4, OUTSIDE_CLIPPED)], H, W)
    hand = np.zeros((H, W), dtype=np.uint8)
    hand[2:6, 1:5] = 1  # the square, outline included
    hand[9:12, 0:3] = 1  # the clipped rectangle
    for r, c in [(6, 6), (6, 7), (6, 8), (6, 9), (7, 6), (7, 7), (7, 8), (8, 6), (8, 7), (9, 6)]:
        hand[r, c] = 1  # the triangle
    np.testing.assert_array_equal(sample.mask, hand)
    np.testing.assert_array_equal(sample.mask, (expected_instances > 0).astype(np.uint8))
    assert sample.mask.dtype == np.uint8
    np.testing.assert_array_equal(sample.image, rgba[..., :3])
    assert sample.image.dtype == np.uint8
    assert (sample.name, sample.group, sample.subset) == (stem, "TCGA-18-5592", "train")
    # the region with 2 vertices is skipped, and counted
    assert report.counts["short region"] == 1 and "region 3 has 2 vertices" in report.notes[0]
    xml = top / "Annotations" / f"{stem}.xml"
    np.testing.assert_array_equal(monuseg.instance_map(xml, (H, W)), expected_instances)


def test_monuseg_test_layout_side_by_side_and_order(tmp_path):
    for stem in ["TCGA-AA-0010-01Z-00-DX1", "TCGA-AA-0002-01Z-00-DX1"]:
        folder_ = tmp_path / "MoNuSegTestData" / "MoNuSegTestData"
        write_monuseg_pair(folder_ / f"{stem}.tif", folder_ / f"{stem}.xml")
    train = tmp_path / "MoNuSeg 2018 Training Data"
    write_monuseg_pair(train / "Tissue Images" / "TCGA-BB-0001.tif", train / "Annotations" / "TCGA-BB-0001.xml")
    samples = list(monuseg.read(tmp_path))
    assert [(s.name, s.subset) for s in samples] == [("TCGA-AA-0002-01Z-00-DX1", "test"),
                                                      ("TCGA-AA-0010-01Z-00-DX1", "test"),
                                                      ("TCGA-BB-0001", "train")]


def test_monuseg_errors(tmp_path):
    folder_ = tmp_path / "MoNuSegTestData"
    write_monuseg_pair(folder_ / "a.tif", folder_ / "a.xml")
    (folder_ / "b.tif").write_bytes((folder_ / "a.tif").read_bytes())
    with raises_one_line(folder_ / "b.tif", "no b.xml"):
        monuseg.read(tmp_path)
    (folder_ / "b.xml").write_text("<Annotations><Regions><Region>")  # unclosed tags
    samples = monuseg.read(tmp_path)
    next(samples)
    with raises_one_line(folder_ / "b.xml", "XML"):
        next(samples)
    (folder_ / "b.xml").write_text((folder_ / "a.xml").read_text())
    truncate(folder_ / "b.tif", 0.3)
    with raises_one_line(folder_ / "b.tif", "unreadable TIFF"):
        list(monuseg.read(tmp_path))
    (folder_ / "b.tif").unlink()
    write_imagescope_xml(tmp_path / "elsewhere" / "a.xml", [SQUARE])
    with raises_one_line("a.xml", "found twice"):
        monuseg.read(tmp_path)


# --- CHAOS ---------------------------------------------------------------------------------------

# Boundaries of every grey-code range: (lo, hi] -> class.
GREYS = np.array([[0, 55, 56, 63], [70, 71, 110, 111], [126, 135, 136, 175], [176, 200, 201, 240]], np.uint8)
GREY_CLASSES = np.array([[0, 0, 1, 1], [1, 0, 0, 2], [2, 2, 0, 0], [3, 3, 0, 0]], np.uint8)


def test_chaos_grey_code_boundaries():
    np.testing.assert_array_equal(chaos.decode_grey(GREYS), GREY_CLASSES)
    np.testing.assert_array_equal(chaos.decode_grey(np.array([241, 252, 255], np.uint8)), [4, 4, 4])


def slice_pixels(pid: int, k: int) -> np.ndarray:
    """(4, 6) 12-bit values, different per patient and slice, non-square to catch transposes."""
    return (np.arange(24).reshape(4, 6) * 170 + pid * 7 + k) % 4096


def slice_grey(k: int) -> np.ndarray:
    """Ground PNG of slice k: liver (63) in row k % 4, spleen (252) in column 5."""
    grey = np.zeros((4, 6), np.uint8)
    grey[k % 4] = 63
    grey[:, 5] = 252
    return grey


def write_chaos_patient(root: Path, pid: int, slices: list[int], ground: bool = True,
                        sets: str = "Train_Sets") -> Path:
    seq = root / sets / "MR" / str(pid) / "T2SPIR"
    for k in slices:
        write_dicom(seq / "DICOM_anon" / f"IMG-{pid:04d}-{k}.dcm", slice_pixels(pid, k))
        if ground:
            write_png(seq / "Ground" / f"IMG-{pid:04d}-{k}.png", slice_grey(k))
    return seq


def test_chaos_t2spir_pairs_by_natural_order_patients_and_test_set(tmp_path):
    write_chaos_patient(tmp_path, 10, [1, 2])
    write_chaos_patient(tmp_path, 2, [10, 2, 1])  # natural order 1, 2, 10 (string order would be 1, 10, 2)
    write_chaos_patient(tmp_path, 4, [1], ground=False, sets="Test_Sets")
    write_dicom(tmp_path / "Train_Sets" / "CT" / "1" / "DICOM_anon" / "i0000,0000b.dcm", slice_pixels(1, 0))
    samples = list(chaos.read(tmp_path))
    assert [s.name for s in samples] == ["2/IMG-0002-1", "2/IMG-0002-2", "2/IMG-0002-10",
                                         "4/IMG-0004-1", "10/IMG-0010-1", "10/IMG-0010-2"]
    for s in samples:
        pid, k = int(s.group), int(s.name.rsplit("-", 1)[1])
        np.testing.assert_array_equal(s.image, slice_pixels(pid, k))
        assert s.image.shape == (4, 6) and s.image.dtype == np.int16
        if pid == 4:
            assert s.mask is None and s.subset == "test"
            continue
        expected = np.zeros((4, 6), np.uint8)
        expected[k % 4] = 1
        expected[:, 5] = 4
        np.testing.assert_array_equal(s.mask, expected)
        assert s.subset == "train" and s.group == str(pid)


def test_chaos_grey_codes_through_png(tmp_path):
    seq = tmp_path / "Train_Sets" / "MR" / "1" / "T2SPIR"
    write_dicom(seq / "DICOM_anon" / "IMG-0001-00001.dcm", np.zeros((4, 4), np.int16))
    write_png(seq / "Ground" / "IMG-0001-00001.png", GREYS)
    [sample] = list(chaos.read(tmp_path))
    np.testing.assert_array_equal(sample.mask, GREY_CLASSES)


def test_chaos_t1dual_phase_shares_ground(tmp_path):
    seq = tmp_path / "Train_Sets" / "MR" / "3" / "T1DUAL"
    for k in (1, 2):
        write_dicom(seq / "DICOM_anon" / "InPhase" / f"IMG-0004-{2 * k}.dcm", slice_pixels(0, k))
        write_dicom(seq / "DICOM_anon" / "OutPhase" / f"IMG-0004-{2 * k - 1}.dcm", slice_pixels(1, k))
        write_png(seq / "Ground" / f"IMG-0002-{k}.png", slice_grey(k))
    for phase, pid in (("InPhase", 0), ("OutPhase", 1)):
        samples = list(chaos.read(tmp_path, sequence="T1DUAL", phase=phase))
        assert len(samples) == 2
        for k, s in zip((1, 2), samples):
            np.testing.assert_array_equal(s.image, slice_pixels(pid, k))
            assert s.mask[k % 4, 0] == 1 and s.mask[(k + 1) % 4, 0] == 0
    with raises_one_line("T2SPIR"):  # only T1DUAL on disk
        chaos.read(tmp_path)
    with raises_one_line("'T3'", "T2SPIR"):
        chaos.read(tmp_path, sequence="T3")


def test_chaos_errors(tmp_path):
    seq = write_chaos_patient(tmp_path, 1, [1, 2, 3])
    (seq / "Ground" / "IMG-0001-3.png").unlink()
    with raises_one_line(seq, "3 slices", "2 masks"):
        chaos.read(tmp_path)
    write_png(seq / "Ground" / "IMG-0001-3.png", np.zeros((5, 6), np.uint8))
    with raises_one_line(seq / "Ground" / "IMG-0001-3.png", seq / "DICOM_anon" / "IMG-0001-3.dcm", "(5, 6)"):
        list(chaos.read(tmp_path))
    write_png(seq / "Ground" / "IMG-0001-3.png", slice_grey(3))
    truncate(seq / "DICOM_anon" / "IMG-0001-2.dcm", 0.9)
    with raises_one_line(seq / "DICOM_anon" / "IMG-0001-2.dcm", "unreadable DICOM"):
        list(chaos.read(tmp_path))
    (seq / "DICOM_anon" / "IMG-0001-2.dcm").write_bytes(b"not a dicom file at all")
    with raises_one_line(seq / "DICOM_anon" / "IMG-0001-2.dcm", "unreadable DICOM"):
        list(chaos.read(tmp_path))
    seq2 = write_chaos_patient(tmp_path, 5, [1], ground=False)  # a training patient without Ground/
    with raises_one_line(seq2 / "Ground", "missing"):
        chaos.read(tmp_path)


# --- JSRT + SCR ----------------------------------------------------------------------------------

S = 8  # fixture image size; masks are S // 2
# Half-resolution SCR masks of JPCLN001 (4 x 4): lungs in the top rows, a clavicle across them.
LEFT_LUNG = np.array([[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]], bool)
RIGHT_LUNG = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0]], bool)
HEART = np.array([[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 1, 1], [0, 0, 1, 0]], bool)
LEFT_CLAVICLE = np.array([[1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]], bool)
RIGHT_CLAVICLE = np.array([[0, 0, 0, 1], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]], bool)
SCR_HALF = np.array([[3, 3, 1, 3], [1, 1, 1, 1], [1, 1, 2, 2], [0, 0, 2, 0]], np.uint8)  # clavicles painted last
ORGAN_MASKS = {"left lung": LEFT_LUNG, "right lung": RIGHT_LUNG, "heart": HEART,
               "left clavicle": LEFT_CLAVICLE, "right clavicle": RIGHT_CLAVICLE}


def raw_values(seed: int) -> np.ndarray:
    return (np.arange(S * S).reshape(S, S) * 61 + seed * 1000) % 4096


def write_scr(root: Path, fold: int, name: str, organs: dict[str, np.ndarray]) -> None:
    for organ, binary in organs.items():
        write_gif(root / "scratch" / f"fold{fold}" / "masks" / organ / f"{name}.gif", binary)


def test_jsrt_raw_big_endian_and_scr_masks_in_both_folds(tmp_path):
    images = tmp_path / "All247images"
    for seed, name in enumerate(["JPCNN002", "JPCLN010", "JPCLN001"]):
        write_jsrt_raw(images / f"{name}.IMG", raw_values(seed))
    write_scr(tmp_path, 1, "JPCLN001", ORGAN_MASKS)
    write_scr(tmp_path, 2, "JPCNN002", {organ: np.zeros((4, 4), bool) for organ in ORGAN_MASKS})
    samples = list(jsrt.read(tmp_path, size=S))
    assert [s.name for s in samples] == ["JPCLN001", "JPCLN010", "JPCNN002"]
    expected_full = np.array([[SCR_HALF[r // 2, c // 2] for c in range(S)] for r in range(S)], np.uint8)
    np.testing.assert_array_equal(samples[0].mask, expected_full)
    assert samples[0].mask[0, 0] == 3  # clavicle painted over lung
    assert samples[1].mask is None  # JPCLN010 has no SCR masks
    np.testing.assert_array_equal(samples[2].mask, np.zeros((S, S), np.uint8))  # fold 2 found
    for s, seed in zip(samples, (2, 1, 0)):
        np.testing.assert_array_equal(s.image, raw_values(seed))  # raw, white-is-zero, not inverted
        assert s.image.dtype == np.uint16 and s.image.dtype.isnative


def test_jsrt_half_resolution_option(tmp_path):
    write_jsrt_raw(tmp_path / "All247images" / "JPCLN001.IMG", raw_values(0))
    write_scr(tmp_path, 1, "JPCLN001", ORGAN_MASKS)
    [sample] = list(jsrt.read(tmp_path, size=S, half=True))
    raw = raw_values(0)
    expected = np.array([[round(raw[2 * r:2 * r + 2, 2 * c:2 * c + 2].mean() + 1e-9) for c in range(S // 2)]
                         for r in range(S // 2)], np.uint16)
    np.testing.assert_array_equal(sample.image, expected)
    np.testing.assert_array_equal(sample.mask, SCR_HALF)


def test_jsrt_errors(tmp_path):
    path = tmp_path / "All247images" / "JPCLN001.IMG"
    write_jsrt_raw(path, raw_values(0))
    with raises_one_line(path, f"{S * S * 2} bytes", "expected 8388608"):  # the real size is the default
        list(jsrt.read(tmp_path))
    truncate(path, 0.75)
    with raises_one_line(path, f"{S * S * 3 // 2} bytes", f"expected {S * S * 2}"):
        list(jsrt.read(tmp_path, size=S))
    write_jsrt_raw(path, raw_values(0))
    write_scr(tmp_path, 1, "JPCLN001", {"left lung": LEFT_LUNG, "heart": HEART})
    with raises_one_line("right lung", "JPCLN001.gif", "missing"):
        jsrt.read(tmp_path, size=S)
    write_scr(tmp_path, 1, "JPCLN001", {o: np.zeros((S, S), bool) for o in ORGAN_MASKS})  # full, not half size
    with raises_one_line("left lung/JPCLN001.gif", str(path), "half"):
        list(jsrt.read(tmp_path, size=S))
    write_scr(tmp_path, 2, "JPCLN001", {"heart": HEART})
    with raises_one_line("found twice", "fold1", "fold2"):
        jsrt.read(tmp_path, size=S)


# --- IDRiD ---------------------------------------------------------------------------------------

IH, IW = 32, 48


def idrid_paths(root: Path, split: str) -> tuple[Path, Path]:
    seg = root / "A. Segmentation"
    return seg / "1. Original Images" / split, seg / "2. All Segmentation Groundtruths" / split


def box(r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
    out = np.zeros((IH, IW), bool)
    out[r0:r1, c0:c1] = True
    return out


def smooth_rgb(seed: int) -> np.ndarray:
    r, c = np.mgrid[0:IH, 0:IW]
    return np.stack([r * 4 + seed * 20, c * 3, np.full_like(r, 100 + seed)], -1).astype(np.uint8)


LESION_DIRS = {"MA": "1. Microaneurysms", "HE": "2. Haemorrhages", "EX": "3. Hard Exudates",
               "SE": "4. Soft Exudates", "OD": "5. Optic Disc"}


def write_idrid(root: Path) -> dict[str, np.ndarray]:
    """Training IDRiD_01 (MA inside HE, EX, OD over EX; SE missing), IDRiD_02 (EX only), testing
    IDRiD_55 (MA only); returns the lesion arrays."""
    lesions = {"01_MA": box(5, 7, 5, 7), "01_HE": box(4, 10, 4, 10), "01_EX": box(20, 25, 30, 40),
               "01_OD": box(22, 30, 35, 45), "02_EX": box(0, 3, 0, 48), "55_MA": box(31, 32, 47, 48)}
    for split, ids in (("a. Training Set", ("01", "02")), ("b. Testing Set", ("55",))):
        images, truth = idrid_paths(root, split)
        for i in ids:
            write_jpeg(images / f"IDRiD_{i}.jpg", smooth_rgb(int(i)))
        for code, folder_name in LESION_DIRS.items():
            (truth / folder_name).mkdir(parents=True, exist_ok=True)
            for i in ids:
                if f"{i}_{code}" in lesions:
                    blue = box(0, 1, 0, 1) if code == "HE" else None  # blue is not red: not lesion
                    write_red_tiff(truth / folder_name / f"IDRiD_{i}_{code}.tif", lesions[f"{i}_{code}"], blue)
    return lesions


def test_idrid_multilabel_paint_order_and_absent_lesions(tmp_path):
    lesions = write_idrid(tmp_path)
    write_jpeg(tmp_path / "B. Disease Grading" / "1. Original Images" / "a. Training Set" / "IDRiD_001.jpg",
               smooth_rgb(0))  # part B is not read
    report = ReadReport()
    pairs = list(idrid.read_multilabel(tmp_path, report=report))
    assert [(s.name, s.subset) for s, _ in pairs] == [("IDRiD_01", "train"), ("IDRiD_02", "train"),
                                                      ("IDRiD_55", "test")]
    empty = np.zeros((IH, IW), bool)
    (s1, stack1), (s2, stack2), (s55, stack55) = pairs
    np.testing.assert_array_equal(stack1, [lesions["01_MA"], lesions["01_HE"], lesions["01_EX"], empty])
    np.testing.assert_array_equal(stack2, [empty, empty, lesions["02_EX"], empty])
    np.testing.assert_array_equal(stack55, [lesions["55_MA"], empty, empty, empty])
    expected1 = np.zeros((IH, IW), np.uint8)
    expected1[4:10, 4:10] = 2
    expected1[5:7, 5:7] = 1  # microaneurysm painted over haemorrhage
    expected1[20:25, 30:40] = 3  # optic disc not read by default
    np.testing.assert_array_equal(s1.mask, expected1)
    # missing files: SE of 01; MA, HE, SE of 02; HE, EX, SE of 55
    assert report.counts["absent lesion"] == 7 and len(report.notes) == 7
    assert any("IDRiD_01_SE.tif" in n and "4. Soft Exudates" in n for n in report.notes)
    assert s1.image.shape == (IH, IW, 3) and s1.image.dtype == np.uint8
    assert np.abs(s1.image.astype(int) - smooth_rgb(1)).max() <= 3  # JPEG is lossy

    report = ReadReport()
    [s1, _, _] = list(idrid.read(tmp_path, report=report, optic_disc=True))
    expected1[22:30, 35:45] = 5
    expected1[20:25, 30:40] = 3  # hard exudate painted over the optic disc
    np.testing.assert_array_equal(s1.mask, expected1)
    assert report.counts["absent lesion"] == 9  # + OD of 02 and 55


def test_idrid_errors(tmp_path):
    write_idrid(tmp_path)
    images, truth = idrid_paths(tmp_path, "a. Training Set")
    orphan = truth / "1. Microaneurysms" / "IDRiD_07_MA.tif"
    write_red_tiff(orphan, box(0, 1, 0, 1))
    with raises_one_line(orphan, "without an image"):
        idrid.read(tmp_path)
    orphan.unlink()
    wrong = truth / "2. Haemorrhages" / "IDRiD_02_HE.tif"
    write_red_tiff(wrong, np.zeros((IH - 1, IW), bool))
    with raises_one_line(wrong, images / "IDRiD_02.jpg", f"({IH - 1}, {IW})"):
        list(idrid.read(tmp_path))
    wrong.unlink()
    truncate(images / "IDRiD_02.jpg", 0.5)
    with raises_one_line(images / "IDRiD_02.jpg", "unreadable image"):
        list(idrid.read(tmp_path))
    import shutil

    shutil.rmtree(truth.parent)
    with raises_one_line(truth.parent, "missing"):
        idrid.read(tmp_path)


# --- folder --------------------------------------------------------------------------------------

def write_folder(root: Path) -> dict[str, np.ndarray]:
    (root / "classes.yaml").parent.mkdir(parents=True, exist_ok=True)
    (root / "classes.yaml").write_text("classes: [background, duodenum, vessel]\n")
    rng = np.random.default_rng(0)
    arrays = {"a1": rng.integers(0, 256, (5, 7, 3), dtype=np.uint8),
              "a10": rng.integers(0, 256, (5, 7), dtype=np.uint8),
              "a2": rng.integers(0, 65536, (5, 7), dtype=np.uint16),
              "u1": rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)}
    masks = {k: rng.integers(0, 3, (5, 7), dtype=np.uint8) for k in ("a1", "a10", "a2")}
    write_png(root / "images" / "a1.png", arrays["a1"])
    write_png(root / "images" / "a10.png", arrays["a10"])
    write_tiff(root / "images" / "a2.tif", arrays["a2"])
    write_png(root / "unlabelled" / "u1.png", arrays["u1"])
    for k, m in masks.items():
        write_png(root / "masks" / f"{k}.png", m)
    return {**arrays, **{f"mask_{k}": m for k, m in masks.items()}}


def test_folder_reads_images_masks_unlabelled(tmp_path):
    arrays = write_folder(tmp_path)
    samples = list(folder.read(tmp_path))
    assert [s.name for s in samples] == ["a1", "a2", "a10", "u1"]
    for s in samples:
        np.testing.assert_array_equal(s.image, arrays[s.name])
        assert s.image.dtype == arrays[s.name].dtype
        if s.name == "u1":
            assert s.mask is None
        else:
            np.testing.assert_array_equal(s.mask, arrays[f"mask_{s.name}"])
            assert s.mask.dtype == np.uint8
    assert class_names("folder", tmp_path) == ["background", "duodenum", "vessel"]


def test_folder_errors(tmp_path):
    write_folder(tmp_path)
    mask = tmp_path / "masks" / "a10.png"
    write_png(mask, np.full((5, 7), 3, np.uint8))
    with raises_one_line(mask, "class id 3", "0..2"):
        list(folder.read(tmp_path))
    write_png(mask, np.zeros((6, 7), np.uint8))
    with raises_one_line(mask, tmp_path / "images" / "a10.png", "(6, 7)"):
        list(folder.read(tmp_path))
    mask.unlink()
    with raises_one_line(tmp_path / "images" / "a10.png", "without a mask"):
        folder.read(tmp_path)
    write_png(tmp_path / "masks" / "zz.png", np.zeros((5, 7), np.uint8))
    write_png(mask, np.zeros((5, 7), np.uint8))
    with raises_one_line(tmp_path / "masks" / "zz.png", "without an image"):
        folder.read(tmp_path)
    (tmp_path / "masks" / "zz.png").unlink()
    write_png(tmp_path / "unlabelled" / "a1.png", np.zeros((5, 7), np.uint8))
    with raises_one_line(tmp_path / "unlabelled" / "a1.png", "images/a1.png"):
        folder.read(tmp_path)
    (tmp_path / "unlabelled" / "a1.png").unlink()
    (tmp_path / "images" / "notes.txt").write_text("hi")
    with raises_one_line(tmp_path / "images" / "notes.txt", ".png"):
        folder.read(tmp_path)
    (tmp_path / "images" / "notes.txt").unlink()
    truncate(tmp_path / "images" / "a1.png", 0.5)
    with raises_one_line(tmp_path / "images" / "a1.png", "unreadable"):
        list(folder.read(tmp_path))
    (tmp_path / "classes.yaml").write_text("names: [background, duodenum]\n")
    with raises_one_line(tmp_path / "classes.yaml", "'classes'"):
        folder.read(tmp_path)
    (tmp_path / "classes.yaml").unlink()
    with raises_one_line(tmp_path / "classes.yaml", "missing"):
        folder.read(tmp_path)


def test_folder_empty(tmp_path):
    (tmp_path / "classes.yaml").write_text("classes: [background, x]\n")
    (tmp_path / "images").mkdir()
    with raises_one_line(tmp_path, "no images found", "images/*"):
        folder.read(tmp_path)
