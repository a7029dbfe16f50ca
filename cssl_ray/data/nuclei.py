"""The real-data default ``nuclei``: fluorescence nuclei and micronuclei from ``mnfinder==1.2.3``.

The MIT-licensed PyPI package ships its training data. We download the wheel with
``pip download --no-deps`` and read it as a zip: the package is never imported (its
``__init__`` imports tensorflow and writes a model folder) and never installed.

Layout inside the wheel (or an unpacked / installed copy of the package):

    mnfinder/{training,validation,test}-data/<set>/images/<name>.tif         the image
    mnfinder/{training,validation,test}-data/<set>/nucleus_masks/<name>.png  RGBA, alpha > 0 = nucleus
    mnfinder/{training,validation,test}-data/<set>/mn_masks/<name>.png       RGBA, alpha > 0 = micronucleus

(``images/`` also holds a ``.png`` copy of each image, and ``<set>/`` a ``.psp`` project file:
both ignored.) 49 pairs: 30 training, 3 validation, 16 test, from several cell lines.

image   single channel uint8 or uint16 ``.tif`` (768x869, 512x512, 1024x1024), as stored
mask    0 background, 1 nucleus (nucleus alpha > 0), 2 micronucleus (mn alpha > 0, painted over 1)
name    "<subset>/<set>/<name>"; subset from the top folder (train / val / test); group = <set>
        (the acquisition set, "<date>_<cell line>"; the distribution's own split reuses sets
        across subsets, so fixed subsets, not groups, keep val and test apart here)
"""
from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from PIL import Image

from cssl_ray.data.sample import DatasetError, Sample

CLASSES = ["background", "nucleus", "micronucleus"]
PACKAGE, VERSION = "mnfinder", "1.2.3"
SUBSETS = {"training-data": "train", "validation-data": "val", "test-data": "test"}
_IMAGE = re.compile(r"^(?:.*/)?mnfinder/(training|validation|test)-data/([^/]+)/images/([^/]+)\.tiff?$")


def summary_hint() -> str:
    return (f"prepared from the PyPI package {PACKAGE}=={VERSION} (pip download --no-deps, read as a zip, "
            "never imported): 49 image/mask pairs, 30 train / 3 val / 16 test, classes background, nucleus, "
            "micronucleus; no manual download")


# ---------------------------------------------------------------------------------------------
# Getting the wheel.


def wheel_name() -> str:
    return f"{PACKAGE}-{VERSION}-py3-none-any.whl"


def fetch(folder: str | Path, *, timeout: float = 900) -> Path:
    """The mnfinder wheel in ``folder``, downloaded with pip (``--no-deps``) if it is not there yet.

    The download goes to a private temp folder and is moved into place when complete, so an
    interrupted download never leaves a partial wheel. DatasetError (one line) when pip fails."""
    folder = Path(folder)
    target = folder / wheel_name()
    if target.is_file():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".pip-{os.getpid()}"
    try:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-input", "--disable-pip-version-check",
               "--only-binary", ":all:", f"{PACKAGE}=={VERSION}", "-d", str(tmp)]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise DatasetError(f"nuclei: pip download {PACKAGE}=={VERSION} took longer than {timeout:.0f} s") from None
        wheels = sorted(tmp.glob(f"{PACKAGE}-{VERSION}-*.whl"))
        if done.returncode != 0 or not wheels:
            lines = [ln.strip() for ln in (done.stderr or done.stdout or "").splitlines() if ln.strip()]
            why = lines[-1] if lines else f"exit code {done.returncode}"
            raise DatasetError(f"nuclei: pip download --no-deps {PACKAGE}=={VERSION} failed ({why}); "
                               f"or put {wheel_name()} in {folder} by hand")
        os.replace(wheels[0], target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def locate(root: str | Path | None, downloads: str | Path) -> Path:
    """The source to read: ``root`` if given (a wheel, a folder holding one, or a folder holding
    an unpacked ``mnfinder/`` package), else the wheel in ``downloads`` (fetched if needed)."""
    if root is None or str(root) == "":
        return fetch(downloads).resolve()
    path = Path(root).expanduser().resolve()
    if path.is_file() and path.suffix in (".whl", ".zip"):
        return path
    if path.is_dir():
        wheels = sorted(path.glob(f"{PACKAGE}-{VERSION}-*.whl"))
        if wheels:
            return wheels[0]
        if (path / PACKAGE / "training-data").is_dir() or (path.name == PACKAGE and (path / "training-data").is_dir()):
            return path
    raise DatasetError(f"{path}: no {wheel_name()} and no unpacked {PACKAGE}/training-data here; leave data.root "
                       f"empty to download it with pip")


# ---------------------------------------------------------------------------------------------
# Reading.


class _Files:
    """Uniform access to the package files in a wheel (zip) or a folder."""

    def __init__(self, root: Path):
        self.root = root
        self.zip: zipfile.ZipFile | None = None
        if root.is_file():
            try:
                self.zip = zipfile.ZipFile(root)
            except (zipfile.BadZipFile, OSError) as e:
                raise DatasetError(f"{root}: not a readable wheel ({e})") from None
            self.names = sorted(n for n in self.zip.namelist() if not n.endswith("/"))
        else:
            base = root.parent if root.name == PACKAGE else root
            self.names = sorted(p.relative_to(base).as_posix() for p in (base / PACKAGE).rglob("*") if p.is_file())
            self.base = base

    def where(self, name: str) -> str:
        return f"{self.root}!{name}" if self.zip is not None else str(self.base / name)

    def read(self, name: str) -> bytes:
        try:
            if self.zip is not None:
                return self.zip.read(name)
            return (self.base / name).read_bytes()
        except KeyError:
            raise DatasetError(f"{self.where(name)}: file missing") from None
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise DatasetError(f"{self.where(name)}: unreadable ({e})") from None

    def close(self) -> None:
        if self.zip is not None:
            self.zip.close()


def read(root: str | Path, report: Any = None) -> Iterator[Sample]:
    """Every image/mask pair of the package at ``root`` (a wheel or a folder; see ``locate``), in
    the order training, validation, test, then by set and name. ``report`` is accepted for a
    uniform reader API; this set has no documented absences."""
    root = Path(root)
    if not root.exists():
        raise DatasetError(f"{root}: does not exist; {summary_hint()}")
    files = _Files(root)
    order = {"training": 0, "validation": 1, "test": 2}
    pairs = []
    for n in files.names:
        m = _IMAGE.match(n)
        if m:
            pairs.append((order[m.group(1)], m.group(2), m.group(3), n))
    if not pairs:
        files.close()
        raise DatasetError(f"{root}: no {PACKAGE}/<subset>-data/<set>/images/*.tif inside; {summary_hint()}")
    pairs.sort()
    return _samples(files, pairs)


def _samples(files: _Files, pairs: list[tuple[int, str, str, str]]) -> Iterator[Sample]:
    try:
        for _, set_name, stem, image_name in pairs:
            folder = PurePosixPath(image_name).parent.parent  # .../<subset>-data/<set>
            subset = SUBSETS[folder.parent.name]
            image = _tif(files, image_name)
            nucleus = _alpha(files, f"{folder}/nucleus_masks/{stem}.png")
            mn = _alpha(files, f"{folder}/mn_masks/{stem}.png")
            for mask_name, alpha in ((f"{folder}/nucleus_masks/{stem}.png", nucleus), (f"{folder}/mn_masks/{stem}.png", mn)):
                if alpha.shape != image.shape[:2]:
                    raise DatasetError(f"{files.where(mask_name)}: mask {alpha.shape} does not match image "
                                       f"{image.shape[:2]} of {files.where(image_name)}")
            mask = np.zeros(image.shape[:2], dtype=np.uint8)
            mask[nucleus > 0] = 1
            mask[mn > 0] = 2  # micronuclei are painted over nuclei
            yield Sample(name=f"{subset}/{set_name}/{stem}", image=image, mask=mask, group=set_name,
                         subset=subset, source=files.where(image_name))
    finally:
        files.close()


def _tif(files: _Files, name: str) -> np.ndarray:
    import tifffile  # imported here: only this reader needs it
    data = files.read(name)
    try:
        image = tifffile.imread(io.BytesIO(data), key=0)
    except Exception as e:  # noqa: BLE001 - tifffile raises many types on bad bytes
        raise DatasetError(f"{files.where(name)}: unreadable TIFF ({type(e).__name__}: {e})") from None
    if image.ndim == 3 and image.shape[0] in (3, 4) and image.shape[2] not in (3, 4):
        image = np.moveaxis(image, 0, -1)  # planar (C, H, W) TIFF -> (H, W, C)
    if image.size == 0:
        raise DatasetError(f"{files.where(name)}: unreadable TIFF (no image data)")
    if image.ndim not in (2, 3):
        raise DatasetError(f"{files.where(name)}: expected a 2D image, got shape {image.shape}")
    return image


def _alpha(files: _Files, name: str) -> np.ndarray:
    """The alpha channel (H, W) of an RGBA / LA mask PNG."""
    data = files.read(name)
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            if "A" not in im.getbands():
                raise DatasetError(f"{files.where(name)}: mask has no alpha channel (mode {im.mode}); expected RGBA")
            return np.asarray(im.getchannel("A"))
    except DatasetError:
        raise
    except Exception as e:  # noqa: BLE001 - Pillow raises OSError, SyntaxError, ValueError, ...
        raise DatasetError(f"{files.where(name)}: unreadable mask PNG ({type(e).__name__}: {e})") from None
