"""The nuclei reader on a tiny fake wheel (pixel for pixel), the pip fetch, and one slow test on
the real mnfinder 1.2.3 data."""
from __future__ import annotations

import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from fixtures_nuclei import WHEEL, fake_pairs, rgba_png, tif, write_wheel

from cssl_ray.data import nuclei
from cssl_ray.data.cards import load_card
from cssl_ray.data.sample import DatasetError


def test_reads_every_pair_pixel_for_pixel(tmp_path):
    wheel = tmp_path / WHEEL
    pairs = write_wheel(wheel)
    samples = list(nuclei.read(wheel))
    assert [s.name for s in samples] == [p["name"] for p in pairs]  # training, validation, test
    for s, p in zip(samples, pairs):
        assert s.image.dtype == p["image"].dtype and np.array_equal(s.image, p["image"])
        assert s.mask.dtype == np.uint8 and np.array_equal(s.mask, p["expected"]), s.name
        assert s.subset == {"training-data": "train", "validation-data": "val", "test-data": "test"}[p["top"]]
        assert s.group == p["set"]
        assert s.source == f"{wheel}!mnfinder/{p['top']}/{p['set']}/images/{p['stem']}.tif"
    assert "mnfinder" not in sys.modules  # read as a zip, never imported


def test_reads_an_unpacked_package_folder_the_same(tmp_path):
    wheel = tmp_path / WHEEL
    write_wheel(wheel)
    with zipfile.ZipFile(wheel) as z:
        z.extractall(tmp_path / "site")
    from_zip = list(nuclei.read(wheel))
    for root in (tmp_path / "site", tmp_path / "site" / "mnfinder"):
        located = nuclei.locate(root, tmp_path / "unused")
        from_dir = list(nuclei.read(located))
        assert [s.name for s in from_dir] == [s.name for s in from_zip]
        assert all(np.array_equal(a.mask, b.mask) and np.array_equal(a.image, b.image)
                   for a, b in zip(from_dir, from_zip))


def test_locate_accepts_a_wheel_or_its_folder_and_rejects_others(tmp_path):
    wheel = tmp_path / "w" / WHEEL
    write_wheel(wheel)
    assert nuclei.locate(wheel, tmp_path / "d") == wheel
    assert nuclei.locate(wheel.parent, tmp_path / "d") == wheel
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="empty: no mnfinder-1.2.3"):
        nuclei.locate(tmp_path / "empty", tmp_path / "d")


def test_locate_without_root_uses_the_downloads_folder(tmp_path):
    write_wheel(tmp_path / "downloads" / WHEEL)
    assert nuclei.locate(None, tmp_path / "downloads") == (tmp_path / "downloads" / WHEEL).resolve()


@pytest.mark.parametrize("member, data, words", [
    ("mnfinder/training-data/2022-03-18_RPE1/images/3.tif", b"II*\x00garbage", ["3.tif", "unreadable TIFF"]),
    ("mnfinder/training-data/2022-03-18_RPE1/images/3.tif", "truncated", ["3.tif", "unreadable TIFF"]),
    ("mnfinder/training-data/2022-03-18_RPE1/nucleus_masks/3.png", b"\x89PNG\r\n", ["nucleus_masks/3.png",
                                                                                      "unreadable mask PNG"]),
    ("mnfinder/training-data/2022-03-18_RPE1/mn_masks/3.png", "size", ["mn_masks/3.png", "does not match image"]),
    ("mnfinder/training-data/2022-03-18_RPE1/mn_masks/3.png", "no alpha", ["mn_masks/3.png", "no alpha channel"]),
])
def test_bad_files_name_the_member(tmp_path, member, data, words):
    if data == "truncated":
        whole = tif(np.arange(4200, dtype=np.uint16).reshape(42, 100))
        data = whole[: len(whole) // 2]
    elif data == "size":
        data = rgba_png(np.zeros((3, 3), np.uint8))
    elif data == "no alpha":
        import io

        from PIL import Image
        buf = io.BytesIO()
        Image.fromarray(np.zeros((6, 7), np.uint8), "L").save(buf, format="PNG")
        data = buf.getvalue()
    wheel = tmp_path / WHEEL
    write_wheel(wheel, override={member: data})
    with pytest.raises(DatasetError) as info:
        list(nuclei.read(wheel))
    message = str(info.value)
    assert "\n" not in message and str(wheel) in message
    for word in words:
        assert word in message


def test_missing_mask_and_empty_wheel(tmp_path):
    wheel = tmp_path / WHEEL
    write_wheel(wheel, skip=("mnfinder/test-data/2022-10-14_U2OS/mn_masks/4.png",))
    with pytest.raises(DatasetError, match="mn_masks/4.png: file missing"):
        list(nuclei.read(wheel))
    empty = tmp_path / "empty" / WHEEL
    write_wheel(empty, pairs=[])
    with pytest.raises(DatasetError, match="no mnfinder/<subset>-data"):
        nuclei.read(empty)
    (tmp_path / "broken.whl").write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(DatasetError, match="not a readable wheel"):
        nuclei.read(tmp_path / "broken.whl")


def test_tiny_images_of_every_real_dtype(tmp_path):
    pairs = fake_pairs()
    pairs[0]["image"] = np.arange(42, dtype=np.uint8).reshape(6, 7)
    wheel = tmp_path / WHEEL
    write_wheel(wheel, pairs)
    assert next(iter(nuclei.read(wheel))).image.dtype == np.uint8
    assert tif(np.zeros((2, 2), np.uint16))[:2] in (b"II", b"MM")


class _Done:
    def __init__(self, returncode: int, stderr: str = ""):
        self.returncode, self.stderr, self.stdout = returncode, stderr, ""


def test_fetch_runs_pip_download_no_deps_once(tmp_path, monkeypatch):
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        dest = Path(cmd[cmd.index("-d") + 1])
        write_wheel(dest / WHEEL)
        return _Done(0)

    monkeypatch.setattr(subprocess, "run", fake_run)
    first = nuclei.fetch(tmp_path / "dl")
    again = nuclei.fetch(tmp_path / "dl")
    assert first == again == tmp_path / "dl" / WHEEL and len(calls) == 1
    cmd = calls[0]
    assert cmd[:4] == [sys.executable, "-m", "pip", "download"]
    assert "--no-deps" in cmd and "mnfinder==1.2.3" in cmd
    assert [p.name for p in (tmp_path / "dl").iterdir()] == [WHEEL]  # the temp folder is gone


def test_fetch_failure_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: _Done(1, "ERROR: No matching distribution found\n"))
    with pytest.raises(DatasetError) as info:
        nuclei.fetch(tmp_path / "dl")
    assert "No matching distribution found" in str(info.value) and "\n" not in str(info.value)
    assert list((tmp_path / "dl").iterdir()) == []


_OFFLINE = ("No matching distribution", "Could not find a version", "connection", "Connection", "resolve",
            "Network", "timed out", "took longer")


@pytest.mark.slow
def test_real_nuclei_set_matches_datasets_md(tmp_path):
    """Prepares the real set: the wheel is pip-downloaded once into the shared cache's downloads/
    (68 MB), the store is written to a temp cache so the preparation itself is measured."""
    from cssl_ray.data.cache import cache_dir
    from cssl_ray.data.prepare import prepare
    from cssl_ray.data.summary import pixel_shares
    try:
        wheel = nuclei.fetch(cache_dir() / "downloads")
    except DatasetError as e:
        if any(word in str(e) for word in _OFFLINE):
            pytest.skip(f"pip cannot reach the package registry: {e}")
        raise
    start = time.perf_counter()
    store = prepare("nuclei", wheel, cache=tmp_path)
    seconds = time.perf_counter() - start
    s, expected = store.summary, load_card("nuclei").expected  # the card holds DATASETS.md's numbers
    assert store.fresh and store.num_rows == expected["images"] == 49
    assert s["images"] == {k: expected[k] for k in ("train", "val", "test")} and s["labelled"] == s["images"]
    assert store.classes == ["background", "nucleus", "micronucleus"]
    shares = pixel_shares(s, "train")
    assert expected["pixel_share_train"] == [92.9, 6.9, 0.22]
    for got, want in zip(shares, expected["pixel_share_train"]):
        assert abs(got - want) < 0.5, shares
    print(f"real nuclei prepared in {seconds:.1f} s: {s['images']}, train shares {[round(x, 3) for x in shares]}")
