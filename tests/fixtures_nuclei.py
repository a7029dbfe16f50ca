"""A tiny fake ``mnfinder-1.2.3`` wheel in the real layout, for tests/test_nuclei.py and the CLI tests.

Layout as the real wheel: ``mnfinder/<subset>-data/<set>/{images/<n>.tif, images/<n>.png,
nucleus_masks/<n>.png, mn_masks/<n>.png}``, a ``.psp`` per set, ``test-data/image-info.csv``, and a
package ``__init__`` that raises if anything ever imports it.
"""
from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

WHEEL = "mnfinder-1.2.3-py3-none-any.whl"


def rgba_png(alpha: np.ndarray, blue: np.ndarray | None = None, green: np.ndarray | None = None) -> bytes:
    """An RGBA PNG as mnfinder stores masks: blue = instance id, green = mn index, alpha = foreground."""
    h, w = alpha.shape
    rgba = np.zeros((h, w, 4), np.uint8)
    if blue is not None:
        rgba[..., 2] = blue
    if green is not None:
        rgba[..., 1] = green
    rgba[..., 3] = alpha
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, format="PNG")
    return buf.getvalue()


def tif(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, array)
    return buf.getvalue()


def fake_pairs() -> list[dict]:
    """Three pairs (train uint16 6x7, val uint8 5x5, test uint16 4x4) with expected semantic masks.

    Traps: a nucleus pixel whose RGB is set but alpha 0 (not foreground); a micronucleus over a
    nucleus (class 2 wins); a micronucleus outside any nucleus; a name with spaces."""
    rng = np.random.default_rng(0)
    out = []
    # train / RPE1 / "3"
    image = rng.integers(500, 9000, (6, 7)).astype(np.uint16)
    nuc_alpha = np.zeros((6, 7), np.uint8)
    nuc_alpha[1:4, 1:4] = 255
    nuc_blue = np.zeros((6, 7), np.uint8)
    nuc_blue[1:4, 1:4] = 1
    nuc_blue[5, 6] = 9  # colour without alpha: not foreground
    mn_alpha = np.zeros((6, 7), np.uint8)
    mn_alpha[2, 2] = 255  # over the nucleus
    mn_alpha[0, 6] = 255  # on its own
    expected = np.zeros((6, 7), np.uint8)
    expected[1:4, 1:4] = 1
    expected[2, 2] = 2
    expected[0, 6] = 2
    out.append(dict(top="training-data", set="2022-03-18_RPE1", stem="3", image=image, nuc=(nuc_alpha, nuc_blue),
                    mn=mn_alpha, expected=expected, name="train/2022-03-18_RPE1/3"))
    # val / misc / name with spaces
    image = rng.integers(0, 255, (5, 5)).astype(np.uint8)
    nuc_alpha = np.zeros((5, 5), np.uint8)
    nuc_alpha[0:2, :] = 255
    expected = np.zeros((5, 5), np.uint8)
    expected[0:2, :] = 1
    out.append(dict(top="validation-data", set="2023-05-31_misc", stem="MAX_2022 ATF3.lif - BAY", image=image,
                    nuc=(nuc_alpha, None), mn=np.zeros((5, 5), np.uint8), expected=expected,
                    name="val/2023-05-31_misc/MAX_2022 ATF3.lif - BAY"))
    # test / U2OS / "4": no nuclei at all
    image = rng.integers(1000, 16000, (4, 4)).astype(np.uint16)
    out.append(dict(top="test-data", set="2022-10-14_U2OS", stem="4", image=image,
                    nuc=(np.zeros((4, 4), np.uint8), None), mn=np.zeros((4, 4), np.uint8),
                    expected=np.zeros((4, 4), np.uint8), name="test/2022-10-14_U2OS/4"))
    return out


def write_wheel(path: Path, pairs: list[dict] | None = None, *, skip: tuple[str, ...] = (),
                override: dict[str, bytes] | None = None) -> list[dict]:
    """Write the fake wheel at ``path``; ``skip`` leaves members out, ``override`` replaces their bytes.
    Returns the pairs written (with their ``expected`` masks)."""
    pairs = fake_pairs() if pairs is None else pairs
    members: dict[str, bytes] = {
        "mnfinder/__init__.py": b"raise ImportError('mnfinder must never be imported')\n",
        "mnfinder-1.2.3.dist-info/METADATA": b"Name: mnfinder\nVersion: 1.2.3\n",
        "mnfinder/test-data/image-info.csv": b"image,dataset\n4.tif,2022-10-14_U2OS\n",
    }
    for p in pairs:
        base = f"mnfinder/{p['top']}/{p['set']}"
        members[f"{base}/images/{p['stem']}.tif"] = tif(p["image"])
        members[f"{base}/images/{p['stem']}.png"] = b"not read"
        members[f"{base}/nucleus_masks/{p['stem']}.png"] = rgba_png(p["nuc"][0], p["nuc"][1])
        members[f"{base}/mn_masks/{p['stem']}.png"] = rgba_png(p["mn"])
        members[f"{base}/{p['set']}.psp"] = b"project"
    members.update(override or {})
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            if name not in skip:
                z.writestr(name, data)
    return pairs
