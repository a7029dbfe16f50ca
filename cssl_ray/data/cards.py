"""Dataset cards: ``datasets/<name>.yaml``, one per dataset, read and checked here.

A card says what a dataset is and how the paper used it; the code reads from it the reader
(``format``), the classes, the channels, the preprocessing and the split rule:

    name           the file's stem; what ``data.name`` and ``python -m cssl_ray.data prepare`` take
    format         the reader: ``nuclei``, ``synthetic`` or a name in ``cssl_ray.data.formats``
    channels       1 or 3; null = any (images are converted to ``data.in_channels``)
    classes        class names by id (0 = background); null = from the dataset's own classes file
    preprocessing  {normalise: percentile | scale | jsrt12 | none, low, high} (``preprocess.py``)
    splits         {fixed: subsets the distribution fixes, val_fraction, test_fraction,
                    labelled_by: image | group} (``splits.split_dataset``)
    paper          {labelled: the paper's label fractions or counts, metric, notes}
    metric         dice | miou | auprc: what to report for this dataset
    download, homepage, licence, title, modality, group, notes, expected: for people (and tests)

The cards live in the repository's top-level ``datasets/`` folder (not a Python package: it would
shadow the ``datasets`` library); ``CSSL_RAY_DATASETS`` points elsewhere. Unknown keys, missing
keys and bad values raise ``CardError`` with one line naming the file and the key.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cssl_ray.data.preprocess import NORMALISERS, Preprocessing

METRICS = ("dice", "miou", "auprc")
SUBSETS = ("train", "val", "test")


class CardError(ValueError):
    """A bad dataset card; the message is one line naming the file and the key."""


@dataclass(frozen=True)
class SplitRule:
    fixed: tuple[str, ...] = ()  # subsets the distribution defines (kept as they are)
    val_fraction: float = 0.0  # share of groups carved into val when the distribution has no val
    test_fraction: float = 0.0  # share of groups carved into test when it has no test
    labelled_by: str = "image"  # unit of D_L: single images, or whole groups (patients)


@dataclass(frozen=True)
class PaperProtocol:
    labelled: tuple[str, ...] = ()  # e.g. ("20%", "50%", "100%") or ("|D_L| = 25",)
    metric: str = "dice"
    notes: str = ""


@dataclass(frozen=True)
class DatasetCard:
    name: str
    title: str
    format: str
    modality: str
    channels: int | None
    classes: tuple[str, ...] | None
    normalise: str
    low: float
    high: float
    group: str
    splits: SplitRule
    paper: PaperProtocol
    metric: str
    download: str
    homepage: str
    licence: str
    notes: str = ""
    expected: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    @property
    def num_classes(self) -> int | None:
        return None if self.classes is None else len(self.classes)

    def preprocessing(self, size: tuple[int, int] | None, channels: int, normalise: str = "auto") -> Preprocessing:
        """The store's settings for this card at ``size`` (None = native) and ``channels``;
        ``normalise`` other than ``auto`` replaces the card's method."""
        method = self.normalise if normalise == "auto" else normalise
        return Preprocessing(normalise=method, low=self.low, high=self.high, size=size, channels=channels)


# (required, types) per key; types as accepted by isinstance
_TOP: dict[str, tuple[bool, tuple[type, ...]]] = {
    "name": (True, (str,)), "title": (True, (str,)), "format": (True, (str,)), "modality": (True, (str,)),
    "channels": (True, (int, type(None))), "classes": (True, (list, type(None))),
    "preprocessing": (True, (dict,)), "group": (True, (str,)), "splits": (True, (dict,)),
    "paper": (True, (dict,)), "metric": (True, (str,)), "download": (True, (str,)),
    "homepage": (False, (str,)), "licence": (True, (str,)), "notes": (False, (str,)),
    "expected": (False, (dict,)),
}
_PREPROCESSING = {"normalise": (True, (str,)), "low": (False, (int, float)), "high": (False, (int, float))}
_SPLITS = {"fixed": (True, (list,)), "val_fraction": (True, (int, float)), "test_fraction": (True, (int, float)),
           "labelled_by": (True, (str,))}
_PAPER = {"labelled": (True, (list,)), "metric": (True, (str,)), "notes": (False, (str,))}


def datasets_dir() -> Path:
    """Folder of the cards: ``$CSSL_RAY_DATASETS``, else ``datasets/`` at the repository root."""
    env = os.environ.get("CSSL_RAY_DATASETS")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "datasets"


def card_names() -> list[str]:
    """Names of the shipped cards, sorted."""
    folder = datasets_dir()
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def load_card(name_or_path: str | Path) -> DatasetCard:
    """The card named ``name`` (``datasets/<name>.yaml``) or at a ``.yaml`` path."""
    text = str(name_or_path)
    path = Path(text) if text.endswith((".yaml", ".yml")) else datasets_dir() / f"{text}.yaml"
    if not path.is_file():
        known = ", ".join(card_names()) or "none"
        raise CardError(f"dataset {text!r}: no card {path}; known datasets: {known}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0] if str(e) else "invalid YAML"
        raise CardError(f"{path}: not valid YAML ({first})") from None
    return parse_card(data, path)


def parse_card(data: Any, path: Path) -> DatasetCard:
    """Check a card's plain dict; ``path`` names the file in errors."""
    _keys(data, _TOP, path, "")
    pre, spl, pap = data["preprocessing"], data["splits"], data["paper"]
    _keys(pre, _PREPROCESSING, path, "preprocessing.")
    _keys(spl, _SPLITS, path, "splits.")
    _keys(pap, _PAPER, path, "paper.")

    def bad(key: str, value: Any, allowed: str) -> CardError:
        return CardError(f"{path}: {key}: {value!r} is not allowed; {allowed}")

    if data["name"] != path.stem:
        raise bad("name", data["name"], f"must equal the file name {path.stem!r}")
    if data["channels"] is not None and data["channels"] not in (1, 3):
        raise bad("channels", data["channels"], "1, 3 or null")
    classes = data["classes"]
    if classes is not None and (len(classes) < 2 or not all(isinstance(c, str) and c for c in classes)
                                or len(set(classes)) != len(classes)):
        raise bad("classes", classes, "a list of >= 2 distinct names (background first), or null")
    if pre["normalise"] not in NORMALISERS:
        raise bad("preprocessing.normalise", pre["normalise"], f"choose one of {', '.join(NORMALISERS)}")
    low, high = float(pre.get("low", 1.0)), float(pre.get("high", 99.8))
    if not 0.0 <= low < high <= 100.0:
        raise bad("preprocessing.low/high", (low, high), "need 0 <= low < high <= 100")
    fixed = spl["fixed"]
    if any(s not in SUBSETS for s in fixed) or len(set(fixed)) != len(fixed):
        raise bad("splits.fixed", fixed, f"distinct names from {', '.join(SUBSETS)}")
    vf, tf = float(spl["val_fraction"]), float(spl["test_fraction"])
    if not (0.0 <= vf < 1.0 and 0.0 <= tf < 1.0 and vf + tf < 1.0):
        raise bad("splits.val_fraction/test_fraction", (vf, tf), "each in [0, 1) and their sum < 1")
    if spl["labelled_by"] not in ("image", "group"):
        raise bad("splits.labelled_by", spl["labelled_by"], "choose image or group")
    for key, value in (("metric", data["metric"]), ("paper.metric", pap["metric"])):
        if value not in METRICS:
            raise bad(key, value, f"choose one of {', '.join(METRICS)}")
    if not all(isinstance(x, str) for x in pap["labelled"]):
        raise bad("paper.labelled", pap["labelled"], "a list of strings such as '20%' or '|D_L| = 25'")
    return DatasetCard(
        name=data["name"], title=data["title"], format=data["format"], modality=data["modality"],
        channels=data["channels"], classes=None if classes is None else tuple(classes),
        normalise=pre["normalise"], low=low, high=high, group=data["group"],
        splits=SplitRule(tuple(fixed), vf, tf, spl["labelled_by"]),
        paper=PaperProtocol(tuple(pap["labelled"]), pap["metric"], pap.get("notes", "")),
        metric=data["metric"], download=data["download"], homepage=data.get("homepage", ""),
        licence=data["licence"], notes=data.get("notes", ""), expected=dict(data.get("expected") or {}),
        path=path)


def _keys(data: Any, spec: dict[str, tuple[bool, tuple[type, ...]]], path: Path, prefix: str) -> None:
    if not isinstance(data, dict):
        raise CardError(f"{path}: {prefix.rstrip('.') or 'card'}: expected a mapping, got {type(data).__name__}")
    for key in data:
        if key not in spec:
            raise CardError(f"{path}: unknown key {prefix + str(key)!r}; allowed: {', '.join(spec)}")
    for key, (required, types) in spec.items():
        if key not in data:
            if required:
                raise CardError(f"{path}: missing key {prefix + key!r}")
            continue
        value = data[key]
        if isinstance(value, bool) or not isinstance(value, types):
            names = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise CardError(f"{path}: {prefix}{key}: expected {names}, got {value!r}")
