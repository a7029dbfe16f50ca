"""Writers of tiny files in the exact on-disk formats of /shared/DATASETS.md, for tests/test_formats.py.

Each writer creates its parent folders. None of them uses the readers' code.
"""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pydicom
import tifffile
from PIL import Image
from pydicom.data import get_testdata_file


def _parent(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def write_imagescope_xml(path: Path, regions: list[list[tuple[float, float]]]) -> None:
    """An Aperio ImageScope annotation as MoNuSeg ships it: <RegionAttributeHeaders> first, then one
    <Region> per polygon of (X = column, Y = row) vertices."""
    lines = ['<Annotations MicronsPerPixel="0.252000">',
             '<Annotation Id="1" Name="" ReadOnly="0" NameReadOnly="0" LineColor="65280" Visible="1">',
             '<Attributes><Attribute Name="Description" Id="0" Value=""/></Attributes>',
             "<Regions>",
             "<RegionAttributeHeaders>",
             '<AttributeHeader Id="9999" Name="Region" ColumnWidth="-1"/>',
             '<AttributeHeader Id="9997" Name="Length" ColumnWidth="-1"/>',
             "</RegionAttributeHeaders>"]
    for i, vertices in enumerate(regions, start=1):
        lines += [f'<Region Id="{i}" Type="0" Zoom="0.5" Selected="0" ImageLocation="" Analyze="1" DisplayId="{i}">',
                  "<Attributes/>", "<Vertices>"]
        lines += [f'<Vertex X="{x:.6f}" Y="{y:.6f}" Z="0"/>' for x, y in vertices]
        lines += ["</Vertices>", "</Region>"]
    lines += ["</Regions>", "<Plots/>", "</Annotation>", "</Annotations>"]
    _parent(path).write_text("\n".join(lines) + "\n")


def write_tiff(path: Path, array: np.ndarray) -> None:
    tifffile.imwrite(_parent(path), array)


def write_png(path: Path, array: np.ndarray) -> None:
    Image.fromarray(array).save(_parent(path))


def write_dicom(path: Path, pixels: np.ndarray) -> None:
    """A real DICOM file: pydicom's own MR_small.dcm (64x64, int16) with its pixels replaced."""
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelData = pixels.astype(np.int16).tobytes()  # MR_small: 16 bits allocated, signed, little endian
    ds.save_as(_parent(path))


def write_jsrt_raw(path: Path, values: np.ndarray) -> None:
    """Headerless big-endian 16-bit raw, packed with struct (not numpy) to keep the byte order explicit."""
    flat = [int(v) for v in values.ravel()]
    _parent(path).write_bytes(struct.pack(f">{len(flat)}H", *flat))


def write_gif(path: Path, binary: np.ndarray) -> None:
    """An SCR-style binary mask: 0 / 255 grey GIF."""
    Image.fromarray(np.where(binary, 255, 0).astype(np.uint8)).save(_parent(path), format="GIF")


def write_jpeg(path: Path, rgb: np.ndarray) -> None:
    Image.fromarray(rgb).save(_parent(path), format="JPEG", quality=100, subsampling=0)


def write_red_tiff(path: Path, lesion: np.ndarray, blue: np.ndarray | None = None) -> None:
    """An IDRiD ground truth: RGB TIFF, lesion pixels red (255, 0, 0); ``blue`` pixels (0, 0, 255)
    are not lesion (channel 0 is 0 there)."""
    rgb = np.zeros((*lesion.shape, 3), dtype=np.uint8)
    rgb[lesion, 0] = 255
    if blue is not None:
        rgb[blue, 2] = 255
    Image.fromarray(rgb).save(_parent(path), format="TIFF")


def truncate(path: Path, keep: float = 0.5) -> None:
    """Cut a file to ``keep`` of its bytes."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
