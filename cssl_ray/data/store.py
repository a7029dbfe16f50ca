"""The dataset store: every dataset prepared once into one Parquet file, read back lazily.

    prepare("nuclei", size=(256, 256))   reader -> preprocess -> <cache>/nuclei-<key>.parquet
    Store.open(path).index()            names, groups, subsets, ... without any pixels
    store.arrays(indices)               images (N, C, H, W) float32, masks (N, H, W) uint8

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

The cache key is the dataset name and format, the resolved root with a fingerprint of its file
listing (names, sizes, mtimes: edited data is prepared again), the reader options, the
preprocessing settings and ``FORMAT_VERSION``. A file is written to a hidden temp name next to
the target and renamed into place only when complete, so a crash never leaves half a cache;
preparing the same key again opens the existing file without calling the reader. The summary
(images per subset, pixel counts per class of the source masks, what the reader passed over)
rides in the Parquet footer metadata under ``cssl_ray``.

Cache folder: ``cache_dir`` argument (``data.cache_dir``), else ``$CSSL_RAY_CACHE``, else
``$XDG_CACHE_HOME/cssl_ray`` (``~/.cache/cssl_ray``); downloads (the nuclei wheel) go to its
``downloads/`` folder. Datasets a user downloads live under ``data/<name>`` of the working folder
unless a root is given (``data.root`` / ``--root``).

Remote cache: the cache may instead be an ``s3://``, ``gs://`` or ``file://`` URI
(``CACHE_URI_SCHEMES``; read through ``pyarrow.fs``, credentials from the environment as
pyarrow finds them). It is read-only and needs no raw files: ``prepare`` looks the store up by the
settings in each ``<name>-*.parquet`` footer (dataset, preprocessing, reader options, format
version), because the cache key needs the raw files' fingerprint. Exactly one file must match. So a
cluster node without the dataset reads the file someone prepared where the data is and copied
there (``python -m cssl_ray.data prepare ... --cache DIR``, then ``aws s3 cp DIR/<file> s3://...``).
A shared folder (NFS, EFS) given as a plain path is an ordinary read-write cache: the key is
computed there, so the raw data must be on that node too; give it as ``file://`` to read it
without the raw data.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from cssl_ray.data.cards import DatasetCard, load_card
from cssl_ray.data.preprocess import Preprocessing, preprocess
from cssl_ray.data.readers import Reader, resolve_reader
from cssl_ray.data.sample import DatasetError, Sample

FORMAT_VERSION = 1  # bump when the schema or the preprocessing code changes what is stored
METADATA_KEY = b"cssl_ray"
ROWS_PER_GROUP = 16  # Parquet row group: the unit of lazy reads (16 x 256^2 float32 = 4 MB)
NUCLEI_NOTE = "the nuclei set needs no download (configs/nuclei.yaml)"
CACHE_URI_SCHEMES = ("s3", "gs", "file")  # a cache given as a URI: read-only, through pyarrow.fs

SCHEMA = pa.schema([
    ("name", pa.string()), ("group", pa.string()), ("subset", pa.string()),
    ("height", pa.int32()), ("width", pa.int32()), ("channels", pa.int32()),
    ("image", pa.binary()), ("mask", pa.binary()), ("digest", pa.string()), ("source", pa.string()),
])
INDEX_COLUMNS = ["name", "group", "subset", "height", "width", "channels", "digest", "source"]


class DatasetMissing(DatasetError):
    """A dataset's files are not on disk; the message says where to get them and where to put them."""


# ---------------------------------------------------------------------------------------------
# Where things live.


def is_uri(text: str | Path) -> bool:
    """``scheme://...`` (a remote store or cache), as opposed to a local path."""
    return isinstance(text, str) and re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", text) is not None


def remote_cache(override: str | Path | None = None) -> str | None:
    """The cache URI when ``override`` (else ``$CSSL_RAY_CACHE``) is one (see the module docstring);
    None for a folder. An unsupported scheme is a one-line DatasetError."""
    text = str(override) if override else os.environ.get("CSSL_RAY_CACHE", "")
    if not is_uri(text):
        return None
    if text.split("://", 1)[0] not in CACHE_URI_SCHEMES:
        raise DatasetError(f"dataset cache {text!r}: cannot read that URI scheme; allowed: a folder or "
                           + ", ".join(f"{s}://" for s in CACHE_URI_SCHEMES))
    return text.rstrip("/")


def cache_dir(override: str | Path | None = None) -> Path:
    """The cache folder: ``override``, else ``$CSSL_RAY_CACHE``, else ``~/.cache/cssl_ray`` (a local
    folder; ``remote_cache`` first for a URI)."""
    if override:
        return Path(override).expanduser().resolve()
    if env := os.environ.get("CSSL_RAY_CACHE"):
        return Path(env).expanduser().resolve()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return (Path(base) / "cssl_ray").resolve()


def default_root(name: str) -> Path:
    """Where a downloaded dataset is expected when no root is given: ``data/<name>`` here."""
    return (Path("data") / name).resolve()


def missing_message(card: DatasetCard, root: Path) -> str:
    """One line: the dataset is not at ``root``, where to download it, and the no-download default."""
    return (f"dataset {card.name!r} is not on disk: {root} does not exist; download it from {card.download}, "
            f"unpack it to {root} as datasets/README.md shows (or set data.root / --root); {NUCLEI_NOTE}")


# ---------------------------------------------------------------------------------------------
# Reading a prepared file.


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
            raise DatasetError(f"{self.path}: not a readable dataset store ({_first_line(e)})") from None
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


# ---------------------------------------------------------------------------------------------
# Preparing.


def cache_key(card: DatasetCard, root: Path | None, pre: Preprocessing, options: dict[str, Any]) -> str:
    """16 hex digits of sha256 over everything that decides the stored bytes."""
    payload = {"version": FORMAT_VERSION, "name": card.name, "format": card.format,
               "root": None if root is None else str(root), "fingerprint": fingerprint(root),
               "options": options, "preprocessing": pre.to_dict()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def fingerprint(root: Path | None) -> str:
    """sha1 of the file listing under ``root`` (relative path, size, mtime): changes when files do."""
    if root is None:
        return ""
    h = hashlib.sha1()
    paths = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    for p in paths:
        st = p.stat()
        h.update(f"{p.relative_to(root) if p != root else p.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def store_path(cache: Path, name: str, key: str) -> Path:
    return cache / f"{name}-{key}.parquet"


def prepare(
    name: str | DatasetCard,
    root: str | Path | None = None,
    *,
    size: tuple[int, int] | None = None,
    channels: int | None = None,
    normalise: str = "auto",
    options: dict[str, Any] | None = None,
    cache: str | Path | None = None,
    force: bool = False,
    progress: bool = False,
    reader: Reader | None = None,
) -> Store:
    """Prepare dataset ``name`` once (or reuse the cached file) and return its ``Store``.

    Args:
        name: a card name (``datasets/<name>.yaml``) or a loaded card.
        root: the dataset's folder; default ``data/<name>`` (nuclei: the downloaded wheel).
        size: (H, W) every image is resized to; None keeps native sizes.
        channels: stored channels; default the card's (1 for cards that leave it open).
        normalise: ``auto`` (the card's method) or one of ``preprocess.NORMALISERS``.
        options: reader options (e.g. ``{"sequence": "T1DUAL"}`` for CHAOS); part of the key.
        cache: cache folder (see the module docstring).
        force: prepare again even if the file exists.
        progress: a tqdm bar over the images.
        reader: replaces the card's reader (tests).

    Raises:
        DatasetMissing: the root does not exist (one line with where to download it).
        DatasetError: bad input data; one line naming the file. Nothing stays in the cache.
    """
    card = name if isinstance(name, DatasetCard) else load_card(name)
    options = dict(options or {})
    if remote := remote_cache(cache):  # read-only: found by its settings, no raw files needed
        if force:
            raise DatasetError(f"{remote}: a remote dataset cache is read-only; prepare into a folder and copy "
                               "the file there")
        return find_prepared(remote, card, card.preprocessing(size, channels or card.channels or 1, normalise),
                             options)
    folder = cache_dir(cache)
    reader = reader or resolve_reader(card.format)
    src = resolve_root(card, root, folder, reader)
    pre = card.preprocessing(size, channels or card.channels or 1, normalise)
    key = cache_key(card, src, pre, options)
    path = store_path(folder, card.name, key)
    if path.is_file() and not force:
        return Store(path)
    folder.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(folder, path)
    classes = reader.classes(src, options)
    meta = {"format_version": FORMAT_VERSION, "dataset": card.name, "format": card.format,
            "root": None if src is None else str(src), "key": key, "classes": classes,
            "preprocessing": pre.to_dict(), "options": options}
    write_store(path, card, reader, src, pre, classes, options, meta, progress=progress)
    store = Store(path)
    store.fresh = True
    return store


def find_prepared(uri: str, card: DatasetCard, pre: Preprocessing, options: dict[str, Any]) -> Store:
    """The one ``<name>-*.parquet`` under the cache ``uri`` whose footer says it holds ``card``
    prepared with ``pre`` and ``options`` (this ``FORMAT_VERSION``); DatasetError, one line, if none
    or several match."""
    want = json.loads(json.dumps({"preprocessing": pre.to_dict(), "options": options}, default=str))
    matches = []
    for store in _remote_stores(uri, card.name):
        m = store.meta
        if (m.get("dataset"), m.get("format_version")) == (card.name, FORMAT_VERSION) \
                and {"preprocessing": m.get("preprocessing"), "options": m.get("options")} == want:
            matches.append(store)
    size = "x".join(map(str, pre.size)) if pre.size else "native"
    settings = f"size {size}, {pre.channels} channel(s), normalise {pre.normalise}" + \
        (f", options {options}" if options else "")
    if not matches:
        raise DatasetMissing(f"{uri}: no prepared {card.name!r} store with {settings}; prepare it where the data is "
                             f"(python -m cssl_ray.data prepare --config <run config> --cache DIR) and copy "
                             f"DIR/{card.name}-*.parquet there")
    if len(matches) > 1:
        which = ", ".join(f"{Path(str(s.path)).name} (from {s.meta.get('root')})" for s in matches)
        raise DatasetError(f"{uri}: {len(matches)} prepared {card.name!r} stores have {settings}: {which}; "
                           "keep one there")
    return matches[0]


def _remote_stores(uri: str, name: str = "") -> list[Store]:
    """The readable ``<name>-*.parquet`` stores directly under a cache URI, by file name."""
    try:
        fs, folder = pafs.FileSystem.from_uri(uri)
        infos = fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
    except (OSError, pa.ArrowException) as e:
        raise DatasetError(f"{uri}: cannot list the dataset cache ({_first_line(e)})") from None
    stores = []
    for info in sorted(infos, key=lambda i: i.base_name):
        if info.type == pafs.FileType.File and info.base_name.startswith(f"{name}-" if name else "") \
                and info.base_name.endswith(".parquet"):
            try:
                stores.append(Store(f"{uri}/{info.base_name}"))
            except DatasetError:
                continue  # not a dataset store: ignored, as list_prepared does
    return stores


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def resolve_root(card: DatasetCard, root: str | Path | None, cache: Path, reader: Reader) -> Path | None:
    """The dataset's source on disk (nuclei: the wheel, downloaded if needed; synthetic: None)."""
    if card.format == "nuclei":
        from cssl_ray.data import nuclei
        return nuclei.locate(root, cache / "downloads")
    if not reader.needs_root:
        return None
    path = Path(root).expanduser().resolve() if root else default_root(card.name)
    if not path.exists():
        raise DatasetMissing(missing_message(card, path))
    return path


def write_store(path: Path, card: DatasetCard, reader: Reader, root: Path | None, pre: Preprocessing,
                classes: list[str], options: dict[str, Any], meta: dict[str, Any], *,
                progress: bool = False) -> None:
    """Read, preprocess and write every sample to a temp file, then rename it to ``path``.

    Any error (bad data, interrupt) removes the temp file and re-raises."""
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    report = _new_report()
    summary = Summary(len(classes))
    writer: pq.ParquetWriter | None = None
    rows: list[dict[str, Any]] = []
    names: set[str] = set()
    start = time.perf_counter()
    bar = _progress(card.name, progress)
    try:
        writer = pq.ParquetWriter(tmp, SCHEMA, compression="zstd")
        kwargs = dict(options)
        if report is not None:
            kwargs["report"] = report
        for sample in reader.read(root, **kwargs):
            where = sample.source or sample.name
            if sample.name in names:
                raise DatasetError(f"{where}: duplicate image name {sample.name!r}")
            names.add(sample.name)
            if sample.mask is not None and sample.mask.size and int(sample.mask.max()) >= len(classes):
                raise DatasetError(f"{where}: class id {int(sample.mask.max())} out of range 0..{len(classes) - 1} "
                                   f"({', '.join(classes)})")
            try:
                image, mask = preprocess(sample.image, sample.mask, pre)
            except ValueError as e:
                raise DatasetError(f"{where}: {e}") from None
            summary.add(sample)
            rows.append(_row(sample, image, mask))
            if len(rows) >= ROWS_PER_GROUP:
                writer.write_table(pa.Table.from_pylist(rows, schema=SCHEMA))
                rows = []
            bar.update(1)
        if not names:
            raise DatasetError(f"{root}: no images found for dataset {card.name!r}")
        if rows:
            writer.write_table(pa.Table.from_pylist(rows, schema=SCHEMA))
        meta = {**meta, "summary": summary.to_dict(report), "seconds": round(time.perf_counter() - start, 2)}
        writer.add_key_value_metadata({METADATA_KEY: json.dumps(meta).encode()})
        writer.close()
        writer = None
        os.replace(tmp, path)
    except BaseException:
        bar.leave = False  # clear the bar: the error is the one line left on the terminal
        if writer is not None:
            try:
                writer.close()
            except Exception:  # noqa: BLE001 - the original error matters, not the cleanup's
                pass
        tmp.unlink(missing_ok=True)
        raise
    finally:
        bar.close()


def _row(sample: Sample, image: np.ndarray, mask: np.ndarray | None) -> dict[str, Any]:
    raw = np.ascontiguousarray(sample.image)
    digest = hashlib.sha1(f"{raw.dtype.str}{raw.shape}".encode() + raw.tobytes()).hexdigest()
    return {"name": sample.name, "group": sample.group, "subset": sample.subset,
            "height": image.shape[1], "width": image.shape[2], "channels": image.shape[0],
            "image": np.ascontiguousarray(image, dtype=np.float32).tobytes(),
            "mask": None if mask is None else np.ascontiguousarray(mask, dtype=np.uint8).tobytes(),
            "digest": digest, "source": sample.source}


class Summary:
    """Images per subset (and how many have masks) and pixel counts per class of the source masks."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self.images: dict[str, int] = {}
        self.labelled: dict[str, int] = {}
        self.pixels: dict[str, list[int]] = {}
        self.sizes: dict[str, int] = {}

    def add(self, s: Sample) -> None:
        subset = s.subset or "unassigned"
        self.images[subset] = self.images.get(subset, 0) + 1
        shape = "x".join(str(d) for d in s.image.shape)
        self.sizes[f"{shape} {s.image.dtype}"] = self.sizes.get(f"{shape} {s.image.dtype}", 0) + 1
        if s.mask is not None:
            self.labelled[subset] = self.labelled.get(subset, 0) + 1
            counts = np.bincount(s.mask.ravel(), minlength=self.num_classes)
            total = self.pixels.setdefault(subset, [0] * self.num_classes)
            for k in range(self.num_classes):
                total[k] += int(counts[k])

    def to_dict(self, report: Any = None) -> dict[str, Any]:
        return {"images": self.images, "labelled": self.labelled, "pixels": self.pixels, "sizes": self.sizes,
                "passed_over": dict(report.counts) if report is not None else {},
                "notes": list(report.notes) if report is not None else []}


def pixel_shares(summary: dict[str, Any], subset: str) -> list[float]:
    """Percent of the labelled pixels of ``subset`` per class (empty if it has no masks)."""
    counts = summary.get("pixels", {}).get(subset)
    if not counts or sum(counts) == 0:
        return []
    total = sum(counts)
    return [100.0 * c / total for c in counts]


def list_prepared(cache: str | Path | None = None) -> list[Store]:
    """Every readable prepared file in the cache, by dataset name then newest first (a remote cache:
    by file name)."""
    if remote := remote_cache(cache):
        return sorted(_remote_stores(remote), key=lambda s: s.meta["dataset"])
    folder = cache_dir(cache)
    stores = []
    for p in folder.glob("*.parquet") if folder.is_dir() else []:
        try:
            stores.append(Store(p))
        except DatasetError:
            continue
    return sorted(stores, key=lambda s: (s.meta["dataset"], -s.path.stat().st_mtime))


def _new_report() -> Any:
    try:
        from cssl_ray.data.formats import ReadReport
    except ImportError:  # formats not importable: readers here take report=None
        return None
    return ReadReport()


def _remove_stale_temps(folder: Path, path: Path) -> None:
    """Temp files of this key left by processes that no longer run (killed mid-write)."""
    for tmp in folder.glob(f".{path.stem}.*.tmp"):
        try:
            pid = int(tmp.name.split(".")[-3])
            os.kill(pid, 0)
        except ProcessLookupError:
            tmp.unlink(missing_ok=True)
        except (ValueError, IndexError, PermissionError, OSError):
            continue


def _progress(name: str, enabled: bool):
    from tqdm.auto import tqdm
    return tqdm(desc=f"prepare {name}", unit="img", disable=not enabled, dynamic_ncols=True)
