"""Readers for the paper's datasets in their exact on-disk formats (``/shared/DATASETS.md``).

Every format module (``monuseg``, ``chaos``, ``jsrt``, ``idrid``, ``folder``) has

    read(root, report=None, **options) -> Iterator[Sample]   natural-sorted, deterministic
    CLASSES: list[str]                                         index = class id, background first
    summary_hint() -> str                                      where to download, how to unpack

``read`` finds and pairs the files *eagerly*, so a missing root, an empty dataset or an unpaired
file raise ``DatasetError`` at the call; pixels are read *lazily*, one sample per step, so an
unreadable file raises when its turn comes. Every ``DatasetError`` is one line: "<path>: <problem>".

Absences a format documents as normal are never errors and never silent: they are counted in the
optional ``ReadReport`` passed as ``report=`` (filled while iterating), one line per file:

    idrid    "absent lesion"   a missing ``IDRiD_XX_<lesion>.tif`` (the lesion is absent: all zero)
    monuseg  "short region"    an XML ``<Region>`` with fewer than 3 vertices (skipped)

The helpers below come before the submodule imports at the bottom on purpose: the submodules
import them from this package while it is still initialising.
"""
from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from cssl_ray.data.sample import DatasetError, Sample


@dataclass
class ReadReport:
    """What a reader passed over on purpose (documented absences), filled while iterating."""

    notes: list[str] = field(default_factory=list)  # one line per file: "<path>: <what>"
    counts: Counter[str] = field(default_factory=Counter)  # kind ("absent lesion", ...) -> number

    def note(self, kind: str, path: str | Path, what: str) -> None:
        self.counts[kind] += 1
        self.notes.append(f"{path}: {what}")

    def __str__(self) -> str:
        return ", ".join(f"{kind}: {n}" for kind, n in sorted(self.counts.items())) or "nothing passed over"


def natural_key(text: str) -> list[int | str]:
    """Sort key in which "IMG-2" < "IMG-10"; digit runs compare as numbers, the rest case-blind."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", text)]


def dataset_error(path: str | Path, problem: str, exc: BaseException | None = None) -> DatasetError:
    """One-line ``DatasetError`` "<path>: <problem> (<Exception>: <message>)"."""
    if exc is not None:
        problem = f"{problem} ({type(exc).__name__}: {exc})"
    return DatasetError(" ".join(f"{path}: {problem}".split()))


def require_dir(root: str | Path, title: str, hint: str) -> Path:
    """``root`` as a Path; DatasetError "<title> not found under <root>: <hint>" if it is no folder."""
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DatasetError(f"{title} not found under {path}: {hint}")
    return path


def visible_files(root: Path, suffixes: tuple[str, ...]) -> list[Path]:
    """Files under ``root`` (recursive) whose suffix is in ``suffixes`` (lower case), skipping
    hidden names and the ``__MACOSX`` resource forks that zips made on a Mac carry."""
    found = []
    for p in root.rglob("*"):
        parts = p.relative_to(root).parts
        if any(part.startswith((".", "__MACOSX")) for part in parts):
            continue
        if p.suffix.lower() in suffixes and p.is_file():
            found.append(p)
    return sorted(found, key=lambda p: natural_key(p.relative_to(root).as_posix()))


def read_pil(path: Path, mode: str | None = None) -> np.ndarray:
    """Pixels of a PNG / JPEG / GIF / TIFF via Pillow, optionally converted to ``mode``; a
    truncated or unreadable file raises a one-line DatasetError naming it."""
    try:
        with Image.open(path) as im:
            im.load()  # Pillow decodes lazily: force it here so truncation raises inside the try
            if mode is not None and im.mode != mode:
                im = im.convert(mode)
            return np.array(im)
    except Exception as exc:  # noqa: BLE001 - Pillow raises OSError, SyntaxError, ValueError, ...
        raise dataset_error(path, "unreadable image", exc) from exc


from cssl_ray.data.formats import chaos, folder, idrid, jsrt, monuseg  # noqa: E402 - see docstring

_MODULES = {"monuseg": monuseg, "chaos": chaos, "jsrt": jsrt, "idrid": idrid, "folder": folder}

READERS: dict[str, Callable[..., Iterator[Sample]]] = {name: m.read for name, m in _MODULES.items()}
# Fixed class lists; ``folder`` reads its own from <root>/classes.yaml (use ``class_names``).
CLASSES: dict[str, list[str]] = {name: m.CLASSES for name, m in _MODULES.items() if name != "folder"}


def get_reader(name: str) -> Callable[..., Iterator[Sample]]:
    """The ``read`` function of format ``name``; DatasetError naming the allowed formats."""
    if name not in READERS:
        raise DatasetError(f"unknown dataset format {name!r}; allowed: {', '.join(READERS)}")
    return READERS[name]


def class_names(name: str, root: str | Path | None = None, **options: object) -> list[str]:
    """Class names of format ``name`` with these reader options (IDRiD's ``optic_disc`` adds a
    class; ``folder`` reads ``<root>/classes.yaml``, so it needs ``root``)."""
    get_reader(name)
    if name == "folder":
        if root is None:
            raise DatasetError("folder format: class names live in <root>/classes.yaml; pass root")
        return folder.read_classes(Path(root) / folder.CLASSES_FILE)
    if name == "idrid":
        return idrid.class_names(optic_disc=bool(options.get("optic_disc", False)))
    return list(CLASSES[name])


def summary_hint(name: str) -> str:
    """One line: where to download format ``name`` and how to lay it out."""
    get_reader(name)
    return _MODULES[name].summary_hint()


__all__ = [
    "CLASSES",
    "READERS",
    "DatasetError",
    "ReadReport",
    "Sample",
    "class_names",
    "get_reader",
    "natural_key",
    "summary_hint",
]
