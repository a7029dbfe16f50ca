"""Dataset cards: every shipped card loads and agrees with its reader; bad cards fail in one line."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cssl_ray.data.cards import CardError, card_names, datasets_dir, load_card
from cssl_ray.data.preprocess import Preprocessing

SHIPPED = ["chaos", "folder", "idrid", "jsrt", "monuseg", "nuclei", "nuclei_tiles", "synthetic"]


def test_every_dataset_has_a_card_and_a_readme_section():
    assert card_names() == SHIPPED
    readme = (datasets_dir() / "README.md").read_text()
    for name in SHIPPED:
        assert f"## {name}" in readme, name


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_card_loads(name):
    card = load_card(name)
    assert card.name == name and card.path == datasets_dir() / f"{name}.yaml"
    assert card.download and card.licence and card.metric in ("dice", "miou", "auprc")
    assert isinstance(card.preprocessing((64, 64), card.channels or 1), Preprocessing)


def test_paper_protocols_are_recorded():
    assert load_card("monuseg").paper.labelled == ("20%", "50%", "100%")
    assert load_card("chaos").paper.labelled == ("50%", "25%", "13%")
    chaos = load_card("chaos").splits
    assert (chaos.val_fraction, chaos.test_fraction, chaos.labelled_by) == (0.15, 0.15, "group")
    assert load_card("jsrt").metric == "miou" and "|D_L| = 25" in load_card("jsrt").paper.labelled
    assert load_card("idrid").metric == "auprc"
    assert load_card("jsrt").normalise == "jsrt12" and load_card("nuclei").normalise == "percentile"
    assert load_card("monuseg").normalise == "scale"


@pytest.mark.parametrize("name", ["chaos", "idrid", "jsrt", "monuseg"])
def test_card_classes_match_the_format_reader(name):
    formats = pytest.importorskip("cssl_ray.data.formats")
    card = load_card(name)
    assert list(card.classes) == formats.class_names(card.format)


def test_nuclei_and_synthetic_classes_match_their_readers():
    from cssl_ray.data import nuclei
    from cssl_ray.data.synthetic import SYNTHETIC_CLASS_NAMES
    assert list(load_card("nuclei").classes) == nuclei.CLASSES
    assert list(load_card("synthetic").classes) == SYNTHETIC_CLASS_NAMES


def _write(tmp_path: Path, name: str = "mine", **changes) -> Path:
    data = yaml.safe_load((datasets_dir() / "monuseg.yaml").read_text())
    data["name"] = name
    for key, value in changes.items():
        node = data
        *parents, last = key.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_a_card_by_path_and_by_env(tmp_path, monkeypatch):
    path = _write(tmp_path)
    assert load_card(path).name == "mine"
    monkeypatch.setenv("CSSL_RAY_DATASETS", str(tmp_path))
    assert card_names() == ["mine"] and load_card("mine").path == path


@pytest.mark.parametrize("change, words", [
    ({"colour": "red"}, ["unknown key 'colour'", "allowed:"]),
    ({"splits.shuffle": True}, ["unknown key 'splits.shuffle'"]),
    ({"metric": "accuracy"}, ["metric", "dice"]),
    ({"channels": 2}, ["channels"]),
    ({"classes": ["background"]}, ["classes"]),
    ({"preprocessing.normalise": "zscore"}, ["preprocessing.normalise"]),
    ({"splits.val_fraction": 0.6, "splits.test_fraction": 0.5}, ["val_fraction"]),
    ({"splits.labelled_by": "slice"}, ["labelled_by"]),
    ({"splits.fixed": ["train", "holdout"]}, ["splits.fixed"]),
    ({"title": 3}, ["title", "expected str"]),
])
def test_bad_cards_name_the_file_and_key(tmp_path, change, words):
    path = _write(tmp_path, **change)
    with pytest.raises(CardError) as info:
        load_card(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    for word in words:
        assert word in message


def test_missing_key_wrong_name_and_bad_yaml(tmp_path):
    path = _write(tmp_path)
    data = yaml.safe_load(path.read_text())
    del data["licence"]
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(CardError, match="missing key 'licence'"):
        load_card(path)
    other = _write(tmp_path, name="other")
    other.rename(tmp_path / "renamed.yaml")
    with pytest.raises(CardError, match="must equal the file name 'renamed'"):
        load_card(tmp_path / "renamed.yaml")
    (tmp_path / "bad.yaml").write_text("name: [unclosed")
    with pytest.raises(CardError, match="bad.yaml: not valid YAML"):
        load_card(tmp_path / "bad.yaml")


def test_unknown_dataset_lists_the_known_ones():
    with pytest.raises(CardError, match="known datasets: chaos, folder"):
        load_card("imagenet")
