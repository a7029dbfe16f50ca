"""The dataset store: every dataset prepared once into one Parquet file, read back lazily.

    prepare("nuclei", size=(256, 256))   reader -> preprocess -> <cache>/nuclei-<key>.parquet
    Store.open(path).index()            names, groups, subsets, ... without any pixels
    store.arrays(indices)               images (N, C, H, W) float32, masks (N, H, W) uint8

This module holds the file format and the reader (``Store``); ``cssl_ray.data.prepare`` writes the
file, ``cssl_ray.data.cache`` says where it lives, ``cssl_ray.data.summary`` what its footer counts.

One row per image, a plain schema that ``ray.data.read_parquet`` reads as is:

    name      string    unique id within the dataset
    group     string    the unit a split must not cut (patient, case, acquisition set)
    subset    string    "train" / "val" / "test" where the distribution fixes it, else null
    height, width, channels   int32   shape of the stored image (C, H, W)
    image     binary    float32 C-order bytes of the *preprocessed* image (intensities in [0, 1])
    mask      binary    uint8 (H, W) class ids; null for an unlabelled image
    digest    string    sha1 of the raw pixels (finds the same image shipped twice)
    source    string    the file it came from

Images are stored preprocessed (normalised, channels first, resized) as float32, not raw: the
trainer and Ray Data then decode a row with one ``np.frombuffer``, the per-modality rules run
once, and at training sizes the file is small (nuclei at 256x256: 8 MB, zstd). A different size or
normalisation is another cache entry (the preprocessing settings are in the cache key).

The summary (images per subset, pixel counts per class of the source masks, what the reader passed
over) rides in the Parquet footer metadata under ``cssl_ray``. A ``Store`` reads a local file or an
``s3://`` / ``gs://`` / ``file://`` URI of one (through ``pyarrow.fs``).
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from cssl_ray.data.sample import DatasetError

FORMAT_VERSION = 2  # bump when the schema, the preprocessing or the layout changes what is stored (2: row groups by bytes)
METADATA_KEY = b"cssl_ray"
# Parquet row groups are the unit of a lazy read: a random read of one row decodes its whole group.
# A group closes at GROUP_BYTES of pixels or ROWS_PER_GROUP rows, whichever comes first, so one row
# per group from 512x512 single-channel float32 up (a read decodes just its image), and at most ~1
# MiB decoded beyond the row below that (version 1: 16 rows always, 48 MiB per read at 3x512x512;
# benchmarks/store_reads.py measures both).
GROUP_BYTES = 1 << 20
ROWS_PER_GROUP = 16
# Column statistics only where a reader could filter on them: min/max of the pixel columns would
# only make the footer, which every process opening the store reads whole, grow with the row groups
STATISTICS_COLUMNS = ["name", "group", "subset", "height", "width", "channels", "digest", "source"]


def group_full(rows: int, pixel_bytes: int) -> bool:
    """Whether a row group of ``rows`` rows holding ``pixel_bytes`` bytes of image and mask is complete."""
    return rows >= ROWS_PER_GROUP or pixel_bytes >= GROUP_BYTES

SCHEMA = pa.schema([
    ("name", pa.string()), ("group", pa.string()), ("subset", pa.string()),
    ("height", pa.int32()), ("width", pa.int32()), ("channels", pa.int32()),
    ("image", pa.binary()), ("mask", pa.binary()), ("digest", pa.string()), ("source", pa.string()),
])
INDEX_COLUMNS = ["name", "group", "subset", "height", "width", "channels", "digest", "source"]


def is_uri(text: str | Path) -> bool:
    """``scheme://...`` (a remote store or cache), as opposed to a local path."""
    return isinstance(text, str) and re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", text) is not None


class Store:
    """A prepared dataset: one Parquet file, read lazily (row groups, selected columns)."""

    def __init__(self, path: str | Path):
        """``path``: a local file, or the ``s3://`` / ``gs://`` / ``file://`` URI of one (kept as a str)."""
        self.path: Path | str = path if is_uri(path) else Path(path)
        try:
            if isinstance(self.path, str):
                fs, inner = pafs.FileSystem.from_uri(self.path)
                self._file = pq.ParquetFile(fs.open_input_file(inner))
            else:
                self._file = pq.ParquetFile(self.path)
            raw = (self._file.metadata.metadata or {}).get(METADATA_KEY)
        except (OSError, pa.ArrowException) as e:
            raise DatasetError(f"{self.path}: not a readable dataset store ({first_line(e)})") from None
        if raw is None:
            raise DatasetError(f"{self.path}: Parquet file without cssl_ray metadata; prepare it again")
        self.meta: dict[str, Any] = json.loads(raw)
        self.fresh = False  # True when this call prepared the file (False: reused from the cache)

    @property
    def num_rows(self) -> int:
        return self._file.metadata.num_rows

    @property
    def classes(self) -> list[str]:
        return list(self.meta["classes"])

    @property
    def summary(self) -> dict[str, Any]:
        return self.meta["summary"]

    def index(self) -> dict[str, list[Any]]:
        """Every column but the pixels, plus ``has_mask``, as plain lists (reads no image bytes)."""
        table = self._file.read(columns=INDEX_COLUMNS)
        out = {c: table.column(c).to_pylist() for c in INDEX_COLUMNS}
        out["has_mask"] = self._file.read(columns=["mask"]).column("mask").is_valid().to_pylist()
        return out

    def iter_rows(self, columns: Sequence[str] | None = None) -> Iterator[dict[str, Any]]:
        """Rows one at a time as dicts, decoding ``image`` / ``mask`` to arrays; one row group in memory."""
        cols = list(columns) if columns is not None else SCHEMA.names
        need = sorted(set(cols) | ({"height", "width", "channels"} if {"image", "mask"} & set(cols) else set()))
        for batch in self._file.iter_batches(batch_size=ROWS_PER_GROUP, columns=need):
            for row in batch.to_pylist():
                yield {c: decode(row, c) for c in cols}

    def arrays(self, indices: Sequence[int] | None = None) -> tuple[list[np.ndarray], list[np.ndarray | None]]:
        """Images (C, H, W) float32 and masks (H, W) uint8 or None of rows ``indices`` (all if None),
        reading only the row groups that hold them."""
        rows = range(self.num_rows) if indices is None else [int(i) for i in indices]
        starts = np.cumsum([0] + [self._file.metadata.row_group(g).num_rows
                                  for g in range(self._file.num_row_groups)])
        wanted: dict[int, list[int]] = {}
        for i in rows:
            if not 0 <= i < self.num_rows:
                raise IndexError(f"{self.path}: row {i} out of range 0..{self.num_rows - 1}")
            wanted.setdefault(int(np.searchsorted(starts, i, side="right") - 1), []).append(i)
        decoded: dict[int, tuple[np.ndarray, np.ndarray | None]] = {}
        cols = ["height", "width", "channels", "image", "mask"]
        for g, members in wanted.items():
            table = self._file.read_row_group(g, columns=cols).to_pylist()
            for i in members:
                row = table[i - int(starts[g])]
                decoded[i] = (decode(row, "image"), decode(row, "mask"))
        return [decoded[i][0] for i in rows], [decoded[i][1] for i in rows]


def decode(row: dict[str, Any], column: str) -> Any:
    """A stored value: ``image`` -> (C, H, W) float32, ``mask`` -> (H, W) uint8 or None, else as is."""
    if column == "image":
        return np.frombuffer(row["image"], dtype=np.float32).reshape(row["channels"], row["height"], row["width"])
    if column == "mask":
        m = row["mask"]
        return None if m is None else np.frombuffer(m, dtype=np.uint8).reshape(row["height"], row["width"])
    return row[column]


def first_line(e: BaseException) -> str:
    """The first line of an error's message (its type's name when the message is empty)."""
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
