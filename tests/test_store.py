"""The Parquet store (atomic writes, cache reuse, lazy reads, bad input) and ``load_bundle`` on
real-format data: nuclei from a fake wheel, and a folder dataset trained end to end."""
from __future__ import annotations

import dataclasses
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from fixtures_nuclei import WHEEL, write_wheel
from PIL import Image

from cssl_ray.config import ConfigError, from_dict
from cssl_ray.data import nuclei
from cssl_ray.data.bundle import load_bundle, open_source
from cssl_ray.data.cache import cache_dir, list_prepared
from cssl_ray.data.cards import load_card
from cssl_ray.data.prepare import prepare
from cssl_ray.data.readers import Reader, read_synthetic
from cssl_ray.data.sample import DatasetError, Sample
from cssl_ray.data.sources import DatasetMissing
from cssl_ray.data.store import SCHEMA, Store


@pytest.fixture
def wheel(tmp_path) -> Path:
    path = tmp_path / "src" / WHEEL
    write_wheel(path)
    return path


def counting(read, calls: list, fail_after: int | None = None, exc: BaseException | None = None):
    """A reader wrapper that counts calls and can raise after ``fail_after`` samples."""
    def wrapped(root, report=None, **options):
        calls.append(root)
        for i, sample in enumerate(read(root, **options)):
            if fail_after is not None and i == fail_after:
                raise exc or RuntimeError("crash mid-write")
            yield sample
    return wrapped


def nuclei_reader(calls: list, **kw) -> Reader:
    return Reader(counting(nuclei.read, calls, **kw), lambda root, options: list(nuclei.CLASSES))


def cache_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != "downloads") if folder.is_dir() else []


def test_round_trip_plain_schema_and_metadata(tmp_path, wheel):
    store = prepare("nuclei", wheel, size=(4, 4), cache=tmp_path / "c")
    assert store.fresh and store.num_rows == 3 and store.path.parent == tmp_path / "c"
    assert pq.read_schema(store.path).remove_metadata() == SCHEMA  # what ray.data.read_parquet sees
    rows = list(store.iter_rows())
    assert [r["subset"] for r in rows] == ["train", "val", "test"]
    assert [r["group"] for r in rows] == ["2022-03-18_RPE1", "2023-05-31_misc", "2022-10-14_U2OS"]
    for r in rows:
        assert r["image"].shape == (1, 4, 4) and r["image"].dtype == np.float32
        assert 0.0 <= r["image"].min() and r["image"].max() <= 1.0
        assert r["mask"].shape == (4, 4) and set(np.unique(r["mask"])) <= {0, 1, 2}
        assert r["source"].startswith(str(wheel))
    s = store.summary
    assert s["images"] == {"train": 1, "val": 1, "test": 1} and s["labelled"] == s["images"]
    assert s["pixels"]["train"] == [42 - 9 - 1, 8, 2]  # of the 6x7 source mask, before resizing
    assert store.meta["preprocessing"]["size"] == [4, 4] and store.meta["classes"] == nuclei.CLASSES


def test_native_size_stores_each_image_at_its_own_shape(tmp_path, wheel):
    store = prepare("nuclei", wheel, cache=tmp_path)
    images, masks = store.arrays()
    assert [i.shape for i in images] == [(1, 6, 7), (1, 5, 5), (1, 4, 4)]
    expected = [p["expected"] for p in write_wheel(tmp_path / "again" / WHEEL)]
    assert all(np.array_equal(m, e) for m, e in zip(masks, expected))


def test_second_prepare_reuses_the_cache_without_reading(tmp_path, wheel):
    calls: list = []
    first = prepare("nuclei", wheel, size=(4, 4), cache=tmp_path, reader=nuclei_reader(calls))
    second = prepare("nuclei", wheel, size=(4, 4), cache=tmp_path, reader=nuclei_reader(calls))
    assert len(calls) == 1 and first.path == second.path and not second.fresh
    prepare("nuclei", wheel, size=(8, 8), cache=tmp_path, reader=nuclei_reader(calls))  # new settings
    prepare("nuclei", wheel, size=(4, 4), cache=tmp_path, normalise="scale", reader=nuclei_reader(calls))
    assert len(calls) == 3 and len(list(tmp_path.glob("nuclei-*.parquet"))) == 3
    prepare("nuclei", wheel, size=(4, 4), cache=tmp_path, force=True, reader=nuclei_reader(calls))
    assert len(calls) == 4


def test_edited_source_files_are_prepared_again(tmp_path):
    root = tmp_path / "data"
    write_folder(root, n=3, size=8)
    card = load_card("folder")
    from cssl_ray.data.formats import get_reader
    calls: list = []
    reader = Reader(counting(get_reader("folder"), calls), lambda r, o: ["background", "a", "b"])
    prepare(card, root, cache=tmp_path / "c", reader=reader)
    prepare(card, root, cache=tmp_path / "c", reader=reader)
    assert len(calls) == 1
    path = root / "images" / "img1.png"
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    prepare(card, root, cache=tmp_path / "c", reader=reader)
    assert len(calls) == 2


@pytest.mark.parametrize("exc", [RuntimeError("crash mid-write"), KeyboardInterrupt()])
def test_a_crash_mid_write_leaves_nothing_in_the_cache(tmp_path, exc):
    cache = tmp_path / "c"
    seen_mid_write: list[list[str]] = []

    def read(root, report=None, **options):
        for i, sample in enumerate(read_synthetic(n_train=30, n_val=2, n_test=2, size=(8, 8))):
            if i == 20:  # one row group (16 rows) is already in the temp file
                seen_mid_write.append(cache_files(cache))
                raise exc
            yield sample

    reader = Reader(read, lambda r, o: ["background", "blob", "band", "dot"], needs_root=False)
    with pytest.raises(type(exc)):
        prepare("synthetic", cache=cache, reader=reader)
    [during] = seen_mid_write
    assert len(during) == 1 and during[0].startswith(".synthetic-") and during[0].endswith(".tmp")
    assert cache_files(cache) == []  # no parquet, no temp file
    assert prepare("synthetic", cache=cache, options={"size": [8, 8]}).num_rows == 64  # a later prepare is whole


def test_stale_temp_files_of_dead_processes_are_removed(tmp_path, wheel):
    store = prepare("nuclei", wheel, size=(4, 4), cache=tmp_path)
    stale = tmp_path / f".{store.path.stem}.999999999.deadbeef.tmp"
    stale.write_bytes(b"half a file")
    store.path.unlink()
    prepare("nuclei", wheel, size=(4, 4), cache=tmp_path)
    assert not stale.exists()


def _reader_of(samples: list[Sample], classes: list[str]) -> Reader:
    return Reader(lambda root, report=None: iter(samples), lambda r, o: classes, needs_root=False)


@pytest.mark.parametrize("samples, words", [
    ([Sample("a", np.zeros((4, 4), np.uint8), np.full((4, 4), 3, np.uint8), source="/d/a.png")],
     ["/d/a.png", "class id 3 out of range 0..2"]),
    ([], ["no images found"]),
    ([Sample("a", np.zeros((4, 4)), None, source="/d/a.png"), Sample("a", np.zeros((4, 4)), None, source="/d/b.png")],
     ["/d/b.png", "duplicate image name 'a'"]),
    ([Sample("a", np.zeros((4, 4, 2)), None, source="/d/two.tif")], ["/d/two.tif", "2-channel"]),
])
def test_bad_input_is_one_line_and_nothing_is_cached(tmp_path, samples, words):
    card = load_card("synthetic")
    with pytest.raises(DatasetError) as info:
        prepare(card, cache=tmp_path, reader=_reader_of(samples, ["background", "a", "b"]))
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message
    assert cache_files(tmp_path) == []


def test_a_mask_of_another_size_names_the_file():
    with pytest.raises(DatasetError, match="/d/a.png: mask \\(3, 3\\) does not match image \\(4, 4\\)"):
        Sample("a", np.zeros((4, 4)), np.zeros((3, 3), np.uint8), source="/d/a.png")


@pytest.mark.parametrize("name", ["monuseg", "chaos", "jsrt", "idrid"])
def test_a_missing_dataset_says_where_to_get_it(tmp_path, name):
    with pytest.raises(DatasetMissing) as info:
        prepare(name, tmp_path / "nowhere", cache=tmp_path / "c")
    message = str(info.value)
    assert "\n" not in message and str(tmp_path / "nowhere") in message
    assert load_card(name).download in message and "nuclei" in message and "datasets/README.md" in message
    assert not (tmp_path / "c").exists()


def test_lazy_reads_across_row_groups(tmp_path):
    store = prepare("synthetic", cache=tmp_path, options={"n_train": 30, "n_val": 3, "n_test": 4, "size": [16, 16]})
    assert store.num_rows == 37 and pq.ParquetFile(store.path).num_row_groups == 3
    images, masks = store.arrays([36, 0, 17])
    rows = list(store.iter_rows(["image", "mask"]))
    for got, i in zip(images, [36, 0, 17]):
        assert np.array_equal(got, rows[i]["image"])
    assert np.array_equal(masks[2], rows[17]["mask"])
    expected = list(read_synthetic(n_train=30, n_val=3, n_test=4, size=(16, 16)))
    assert np.allclose(images[1][0], expected[0].image) and np.array_equal(masks[1], expected[0].mask)
    idx = store.index()
    assert idx["subset"].count("train") == 30 and all(idx["has_mask"])
    with pytest.raises(IndexError, match="row 37 out of range"):
        store.arrays([37])


def test_cache_folder_env_and_listing(tmp_path, monkeypatch, wheel):
    monkeypatch.setenv("CSSL_RAY_CACHE", str(tmp_path / "env"))
    assert cache_dir() == (tmp_path / "env").resolve()
    assert cache_dir(tmp_path / "arg") == (tmp_path / "arg").resolve()
    prepare("nuclei", wheel, size=(4, 4))
    assert [s.meta["dataset"] for s in list_prepared()] == ["nuclei"]
    (tmp_path / "env" / "junk.parquet").write_bytes(b"not parquet")
    assert len(list_prepared()) == 1
    with pytest.raises(DatasetError, match="junk.parquet: not a readable dataset store"):
        Store(tmp_path / "env" / "junk.parquet")


# ---------------------------------------------------------------------------------------------
# load_bundle on stored datasets.


def nuclei_cfg(tmp_path, wheel, **data):
    return from_dict({"patches": {"size": 8, "min_pixels": 1}, "data": {"name": "nuclei", "num_classes": 3, "image_size": [8, 8], "labelled_count": 1,
                               "root": str(wheel), "cache_dir": str(tmp_path / "c"), **data}})


def test_bundle_from_the_nuclei_store(tmp_path, wheel):
    b = load_bundle(nuclei_cfg(tmp_path, wheel).data)
    assert b.labelled_images.shape == (1, 1, 8, 8) and b.labelled_masks.dtype == torch.int64
    assert b.val_images.shape[0] == 1 and b.test_images.shape[0] == 1 and b.unlabelled_images.shape[0] == 0
    assert b.class_names == ["background", "nucleus", "micronucleus"]
    assert [b.names[i] for i in b.split.val] == ["val/2023-05-31_misc/MAX_2022 ATF3.lif - BAY"]


def test_source_reads_the_rows_a_worker_asks_for(tmp_path, wheel):
    """What a Ray run sends its workers: the split without pixels (a few KB), from which a worker or a
    stream task reads just its rows (the same arrays load_bundle stacks), locally or from a URI cache."""
    cfg = nuclei_cfg(tmp_path, wheel).data
    source, whole = open_source(cfg), load_bundle(cfg)
    assert len(pickle.dumps(source)) < 16_000  # index lists and names, no image bytes
    assert source.describe() == "1 labelled, 0 unlabelled, 1 val, 1 test images"
    for part, images, masks in (("labelled", whole.labelled_images, whole.labelled_masks),
                                ("test", whole.test_images, whole.test_masks)):
        x, m = source.take(part, torch.tensor([0]))
        assert torch.equal(x, images) and torch.equal(m, masks) and m.dtype == torch.int64
    assert source.take("unlabelled")[0].shape == (0, 1, 8, 8)
    remote = open_source(nuclei_cfg(tmp_path, wheel, root="", cache_dir=(tmp_path / "c").as_uri()).data)
    assert remote.store.startswith("file://") and torch.equal(remote.take("val", [0])[0], whole.val_images)
    part = source.bundle(labelled=False, unlabelled=1)  # the driver's end of a Ray run: test and a D_U sample
    assert part.labelled_images.shape[0] == 0 and torch.equal(part.test_images, whole.test_images)
    with pytest.raises(ValueError, match="part must be one of labelled, unlabelled, val, test"):
        source.take("train")


def test_a_node_without_the_drivers_store_prepares_its_own_or_says_how_to_share_it(tmp_path, wheel):
    """A per-node cache: the worker's node lacks the driver's file, prepares the same dataset itself
    and reads the same rows; when it cannot (no raw files there), one line names the fix."""
    source = open_source(nuclei_cfg(tmp_path, wheel).data)
    want = source.take("labelled")[0]
    moved = dataclasses.replace(source, store=str(tmp_path / "elsewhere" / "nuclei-x.parquet"))
    assert torch.equal(moved.take("labelled")[0], want)
    lost = dataclasses.replace(moved, store=str(tmp_path / "gone.parquet"),
                               data=dataclasses.replace(source.data, root=str(tmp_path / "no-wheel.whl")))
    with pytest.raises(ConfigError) as info:
        lost.take("labelled")
    assert "\n" not in str(info.value) and "gone.parquet" in str(info.value) and "data.cache_dir" in str(info.value)


@pytest.mark.parametrize("data, words", [
    ({"num_classes": 4}, ["data.num_classes: 4", "'nuclei'", "3 classes", "background, nucleus, micronucleus"]),
    ({"in_channels": 3}, ["data.in_channels: 3", "1 channel"]),
    ({"labelled_count": 5}, ["labelled_count (5) exceeds", "1 labelled images"]),
])
def test_bundle_mismatches_name_the_key_and_the_dataset_value(tmp_path, wheel, data, words):
    with pytest.raises(ConfigError) as info:
        load_bundle(nuclei_cfg(tmp_path, wheel, **data).data)
    for word in words:
        assert word in str(info.value)


def test_bundle_of_a_missing_dataset_fails_at_once_in_one_line(tmp_path):
    cfg = from_dict({"data": {"name": "monuseg", "num_classes": 2, "in_channels": 3,
                              "root": str(tmp_path / "none"), "cache_dir": str(tmp_path / "c")}})
    with pytest.raises(ConfigError) as info:
        load_bundle(cfg.data)
    assert "\n" not in str(info.value) and "monuseg.grand-challenge.org" in str(info.value)


def test_bundle_from_a_remote_cache_needs_no_raw_files(tmp_path, wheel, monkeypatch):
    """data.cache_dir as a URI (file:// here; s3:// and gs:// go through the same pyarrow.fs code):
    read-only, the store found by its settings, neither the wheel nor a download needed."""
    local = load_bundle(nuclei_cfg(tmp_path, wheel).data)  # prepared into tmp_path / "c"
    monkeypatch.setattr(nuclei, "fetch", lambda *a, **k: pytest.fail("a remote cache must not download"))
    uri = (tmp_path / "c").as_uri()
    remote = load_bundle(nuclei_cfg(tmp_path, wheel, root="", cache_dir=uri).data)
    assert torch.equal(remote.labelled_images, local.labelled_images) and remote.names == local.names
    monkeypatch.setenv("CSSL_RAY_CACHE", uri)  # the environment's cache may be a URI too
    assert load_bundle(nuclei_cfg(tmp_path, wheel, root="", cache_dir="").data).names == local.names
    store = prepare("nuclei", size=(8, 8), channels=1, cache=uri + "/")
    assert store.path == f"{uri}/{Path(str(store.path)).name}" and not store.fresh
    assert [s.meta["dataset"] for s in list_prepared(uri)] == ["nuclei"]


@pytest.mark.parametrize("case, words", [
    ("other size", ["no prepared 'nuclei' store with size 16x16", "python -m cssl_ray.data prepare"]),
    ("two matches", ["2 prepared 'nuclei' stores", "keep one"]),
    ("force", ["read-only"]),
    ("scheme", ["data.cache_dir", "'ftp://host/c'", "s3://, gs://, file://"]),
])
def test_remote_cache_errors_are_one_line(tmp_path, wheel, case, words):
    load_bundle(nuclei_cfg(tmp_path, wheel).data)
    uri = (tmp_path / "c").as_uri()
    with pytest.raises((ConfigError, DatasetError)) as info:
        if case == "other size":
            load_bundle(nuclei_cfg(tmp_path, wheel, root="", cache_dir=uri, image_size=[16, 16]).data)
        elif case == "two matches":
            [path] = (tmp_path / "c").glob("nuclei-*.parquet")
            (tmp_path / "c" / "nuclei-copy.parquet").write_bytes(path.read_bytes())
            load_bundle(nuclei_cfg(tmp_path, wheel, root="", cache_dir=uri).data)
        elif case == "force":
            prepare("nuclei", size=(8, 8), cache=uri, force=True)
        else:
            load_bundle(nuclei_cfg(tmp_path, wheel, cache_dir="ftp://host/c").data)
    assert "\n" not in str(info.value)
    for word in words:
        assert word in str(info.value), str(info.value)


def test_check_dataset_is_cheap_and_early(tmp_path, monkeypatch):
    from cssl_ray.data.bundle import check_dataset
    monkeypatch.chdir(tmp_path)
    assert check_dataset(from_dict({}).data) is None  # synthetic
    assert check_dataset(from_dict({"data": {"name": "nuclei", "num_classes": 3}}).data).name == "nuclei"
    with pytest.raises(ConfigError, match="data/chaos does not exist"):
        check_dataset(from_dict({"data": {"name": "chaos", "num_classes": 5}}).data)
    (tmp_path / "data" / "chaos").mkdir(parents=True)
    assert check_dataset(from_dict({"data": {"name": "chaos", "num_classes": 5}}).data).name == "chaos"
    with pytest.raises(ConfigError, match="data.name: dataset 'mnist'"):
        check_dataset(from_dict({"data": {"name": "mnist"}}).data)


def write_folder(root: Path, n: int = 6, size: int = 32, unlabelled: int = 0) -> None:
    """A folder-format dataset: grey PNG images with a bright square (class 1) and bar (class 2)."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.yaml").write_text("classes: [background, square, bar]\n")
    for i in range(n + unlabelled):
        mask = np.zeros((size, size), np.uint8)
        y, x = rng.integers(2, size // 2, 2)
        mask[y:y + size // 4, x:x + size // 4] = 1
        mask[size - 6:size - 3, 2:size - 2] = 2
        image = (40 + 90 * mask + rng.integers(0, 30, (size, size))).astype(np.uint8)
        if i < n:
            Image.fromarray(image).save(root / "images" / f"img{i}.png")
            Image.fromarray(mask).save(root / "masks" / f"img{i}.png")
        else:
            (root / "unlabelled").mkdir(exist_ok=True)
            Image.fromarray(image).save(root / "unlabelled" / f"extra{i}.png")


def test_folder_dataset_trains_end_to_end(tmp_path):
    from cssl_ray.experiments.train import build_config
    from cssl_ray.run.local import run_local
    root = tmp_path / "duodenum"
    write_folder(root, n=6, unlabelled=2)
    cfg = build_config(None, [f"train.out_dir={tmp_path / 'run'}", "train.progress=false", "data.name=folder",
                              f"data.root={root}", f"data.cache_dir={tmp_path / 'c'}", "data.num_classes=3",
                              "data.labelled_fraction=0.5", "train.max_rounds=1"], smoke=True)
    bundle = load_bundle(cfg.data)
    s = bundle.split
    assert (len(s.val), len(s.test), len(s.labelled), len(s.unlabelled)) == (1, 1, 2, 4)  # 6 labelled + 2 unlabelled
    assert bundle.unlabelled_masks_hidden is None  # unlabelled/ has no masks: no pseudo-label accuracy
    result = run_local(cfg)
    assert 0.0 <= result.test["dice_mean"] <= 1.0
    assert (tmp_path / "run" / "split.json").is_file()
    names = json.loads((tmp_path / "run" / "split_names.json").read_text())
    assert len(names["unlabelled"]) == 4 and len(names["labelled"]) == 2
    rounds = [h for h in result.history if h["stage"] == "round"]
    assert rounds and "pseudo_accuracy" not in rounds[0]


@pytest.mark.parametrize("data, key", [
    ({"val_fraction": 1.5}, "data.val_fraction"),
    ({"test_fraction": -0.5}, "data.test_fraction"),
    ({"val_fraction": 0.6, "test_fraction": 0.5}, "data.val_fraction + data.test_fraction"),
    ({"normalise": "zscore"}, "data.normalise"),
    ({"labelled_by": "slice"}, "data.labelled_by"),
    ({"name": "../x"}, "data.name"),
    ({"name": "synthetic", "labelled_count": 41}, "data.labelled_count"),
])
def test_data_config_checks_name_the_key(data, key):
    with pytest.raises(ConfigError, match=key.replace("+", "\\+")):
        from_dict({"data": data})


def test_real_datasets_check_labelled_count_against_their_own_pool():
    cfg = from_dict({"data": {"name": "jsrt", "labelled_count": 50}})  # > n_train (synthetic only)
    assert cfg.data.labelled_count == 50 and cfg.data.val_fraction == -1.0
