"""The dataset cache: its folder or read-only URI, the key a prepared file is named by, and the
prepared files in it (``find_prepared``, ``list_prepared``).

The cache key is the dataset name and format, the resolved root with a fingerprint of its file
listing (names, sizes, mtimes: edited data is prepared again), the reader options, the
preprocessing settings and ``FORMAT_VERSION``.

Cache folder: ``cache_dir`` argument (``data.cache_dir``), else ``$CSSL_RAY_CACHE``, else
``$XDG_CACHE_HOME/cssl_ray`` (``~/.cache/cssl_ray``); downloads (the nuclei wheel) go to its
``downloads/`` folder.

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
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from cssl_ray.data.cards import DatasetCard
from cssl_ray.data.preprocess import Preprocessing
from cssl_ray.data.sample import DatasetError
from cssl_ray.data.sources import DatasetMissing
from cssl_ray.data.store import FORMAT_VERSION, Store, first_line, is_uri

CACHE_URI_SCHEMES = ("s3", "gs", "file")  # a cache given as a URI: read-only, through pyarrow.fs


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
        raise DatasetError(f"{uri}: cannot list the dataset cache ({first_line(e)})") from None
    stores = []
    for info in sorted(infos, key=lambda i: i.base_name):
        if info.type == pafs.FileType.File and info.base_name.startswith(f"{name}-" if name else "") \
                and info.base_name.endswith(".parquet"):
            try:
                stores.append(Store(f"{uri}/{info.base_name}"))
            except DatasetError:
                continue  # not a dataset store: ignored, as list_prepared does
    return stores


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
