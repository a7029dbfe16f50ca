"""Preparing a dataset once: reader -> preprocess -> one Parquet file in the cache (``prepare``).

Preparing the same key again (``cssl_ray.data.cache``) opens the existing file without calling the
reader. A file is written to a hidden temp name next to the target and renamed into place only when
complete, so a crash never leaves half a cache; temp files of killed processes are removed.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cssl_ray.data.cache import cache_dir, cache_key, find_prepared, remote_cache, store_path
from cssl_ray.data.cards import DatasetCard, load_card
from cssl_ray.data.preprocess import Preprocessing, preprocess
from cssl_ray.data.readers import Reader, resolve_reader
from cssl_ray.data.sample import DatasetError, Sample
from cssl_ray.data.sources import resolve_root
from cssl_ray.data.store import FORMAT_VERSION, METADATA_KEY, SCHEMA, STATISTICS_COLUMNS, Store, group_full
from cssl_ray.data.summary import Summary


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
        cache: cache folder or URI (see ``cssl_ray.data.cache``).
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
    group_bytes = 0  # pixels (image + mask bytes) of the open row group
    names: set[str] = set()
    start = time.perf_counter()
    bar = _progress(card.name, progress)
    try:
        writer = pq.ParquetWriter(tmp, SCHEMA, compression="zstd", write_statistics=STATISTICS_COLUMNS)
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
            group_bytes += len(rows[-1]["image"]) + len(rows[-1]["mask"] or b"")
            if group_full(len(rows), group_bytes):  # one write, one row group
                writer.write_table(pa.Table.from_pylist(rows, schema=SCHEMA))
                rows, group_bytes = [], 0
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
