"""``python -m cssl_ray.data``: prepare with a summary, list, and one-line errors with exit code 2."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from fixtures_nuclei import WHEEL, tif, write_wheel

from cssl_ray.data.__main__ import main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def wheel(tmp_path) -> Path:
    path = tmp_path / "src" / WHEEL
    write_wheel(path)
    return path


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_prepare_prints_a_summary_then_reuses_the_cache(tmp_path, wheel, capsys):
    cache = tmp_path / "c"
    code, out, err = run(capsys, "prepare", "nuclei", "--root", str(wheel), "--size", "4", "4",
                         "--cache", str(cache), "--quiet")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("nuclei: 3 images -> ") and "prepared in" in lines[0]
    assert "  train            1      1" in lines and "  test             1      1" in lines
    assert "  classes: 0 background, 1 nucleus, 2 micronucleus" in lines
    train_share = next(ln for ln in lines if ln.startswith("  pixel share (train)"))
    assert "background 76.2%" in train_share and "nucleus 19%" in train_share and "micronucleus 4.76%" in train_share
    code, out, _ = run(capsys, "prepare", "nuclei", "--root", str(wheel), "--size", "4", "4", "--cache", str(cache))
    assert code == 0 and "cached" in out.splitlines()[0]


def test_list_shows_prepared_and_missing_datasets(tmp_path, wheel, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # data/<name> is looked up here
    cache = tmp_path / "c"
    run(capsys, "prepare", "nuclei", "--root", str(wheel), "--size", "4", "4", "--cache", str(cache), "--quiet")
    code, out, _ = run(capsys, "list", "--cache", str(cache))
    assert code == 0
    rows = {ln.split()[0]: ln for ln in out.splitlines()[1:]}
    assert set(rows) == {"chaos", "folder", "idrid", "jsrt", "monuseg", "nuclei", "nuclei_tiles", "synthetic"}
    assert "not prepared" in rows["nuclei_tiles"] and "no download needed" in rows["nuclei_tiles"]
    assert "prepared 4x4 (3 images)" in rows["nuclei"] and "no download needed" in rows["nuclei"]
    assert "not prepared" in rows["monuseg"] and "data/monuseg missing" in rows["monuseg"]
    (tmp_path / "data" / "chaos").mkdir(parents=True)
    _, out, _ = run(capsys, "list", "--cache", str(cache))
    assert "data/chaos found" in out


def test_prepare_from_a_run_config_uses_its_data_settings(tmp_path, wheel, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "data": {"name": "nuclei", "num_classes": 3, "image_size": [16, 16], "root": str(wheel),
                 "cache_dir": str(tmp_path / "c")},
        "patches": {"size": 16}}))
    code, out, err = run(capsys, "prepare", "--config", str(config), "--quiet")
    assert code == 0, err
    from cssl_ray.data.cache import list_prepared
    [store] = list_prepared(tmp_path / "c")
    assert store.meta["preprocessing"]["size"] == [16, 16]


@pytest.mark.parametrize("argv, words", [
    (["prepare", "imagenet"], ["no card", "known datasets"]),
    (["prepare", "monuseg", "--root", "{tmp}/nowhere"], ["is not on disk", "monuseg.grand-challenge.org", "nuclei"]),
    (["prepare", "nuclei", "--root", "{wheel}", "--size", "0", "4"], ["--size", ">= 1"]),
    (["prepare", "nuclei", "--root", "{wheel}", "--option", "novalue"], ["--option", "KEY=VALUE"]),
    (["prepare", "nuclei", "--root", "{wheel}", "--normalise", "zscore"], ["normalise", "zscore"]),
    (["prepare", "nuclei", "--size", "4"], ["--size", "expected 2 arguments"]),
    (["prepare"], ["name a dataset"]),
    (["frobnicate"], ["invalid choice"]),
    (["prepare", "nuclei", "--root", "{bad_wheel}"], ["3.tif", "unreadable TIFF"]),
])
def test_bad_input_exits_2_with_one_line(tmp_path, wheel, capsys, argv, words):
    bad_wheel = tmp_path / "bad" / WHEEL
    whole = tif(__import__("numpy").arange(4200, dtype="uint16").reshape(42, 100))
    write_wheel(bad_wheel, override={"mnfinder/training-data/2022-03-18_RPE1/images/3.tif": whole[:len(whole) // 2]})
    argv = [a.format(tmp=tmp_path, wheel=wheel, bad_wheel=bad_wheel) for a in argv] + ["--cache", str(tmp_path / "c")] \
        if argv[0] == "prepare" else argv
    with pytest.raises(SystemExit) as info:
        raise SystemExit(main(argv))
    assert info.value.code == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.endswith("\n"), err  # a cleared bar leaves only \r
    for word in words:
        assert word in err
    cache = tmp_path / "c"
    assert not cache.exists() or [p.name for p in cache.iterdir() if p.name != "downloads"] == []


def test_module_entry_point_runs(tmp_path):
    done = subprocess.run([sys.executable, "-m", "cssl_ray.data", "list", "--cache", str(tmp_path)],
                          capture_output=True, text=True, cwd=REPO, timeout=60)
    assert done.returncode == 0 and "nuclei" in done.stdout
    bad = subprocess.run([sys.executable, "-m", "cssl_ray.data", "prepare", "nosuch", "--cache", str(tmp_path)],
                         capture_output=True, text=True, cwd=REPO, timeout=60)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
