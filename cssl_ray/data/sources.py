"""Where a dataset's raw files are: the default root, the one-line "not on disk" error, and the
source a card is prepared from (nuclei: the downloaded wheel; synthetic: none).

Datasets a user downloads live under ``data/<name>`` of the working folder unless a root is given
(``data.root`` / ``--root``).
"""
from __future__ import annotations

from pathlib import Path

from cssl_ray.data.cards import DatasetCard
from cssl_ray.data.readers import Reader
from cssl_ray.data.sample import DatasetError

NUCLEI_NOTE = "the nuclei set needs no download (configs/nuclei.yaml)"
WHEEL_FORMATS = ("nuclei", "nuclei_tiles")  # read from the mnfinder wheel, which they fetch with pip


class DatasetMissing(DatasetError):
    """A dataset's files are not on disk; the message says where to get them and where to put them."""


def default_root(name: str) -> Path:
    """Where a downloaded dataset is expected when no root is given: ``data/<name>`` here."""
    return (Path("data") / name).resolve()


def missing_message(card: DatasetCard, root: Path) -> str:
    """One line: the dataset is not at ``root``, where to download it, and the no-download default."""
    return (f"dataset {card.name!r} is not on disk: {root} does not exist; download it from {card.download}, "
            f"unpack it to {root} as datasets/README.md shows (or set data.root / --root); {NUCLEI_NOTE}")


def resolve_root(card: DatasetCard, root: str | Path | None, cache: Path, reader: Reader) -> Path | None:
    """The dataset's source on disk (nuclei: the wheel, downloaded if needed; synthetic: None)."""
    if card.format in WHEEL_FORMATS:
        from cssl_ray.data import nuclei
        return nuclei.locate(root, cache / "downloads")
    if not reader.needs_root:
        return None
    path = Path(root).expanduser().resolve() if root else default_root(card.name)
    if not path.exists():
        raise DatasetMissing(missing_message(card, path))
    return path
