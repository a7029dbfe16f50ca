"""The tracking URI and what stands behind it: ``tracking_uri`` (resolved and made absolute), the
local store file or folder behind a URI, the UI that shows it, and one ``MlflowClient`` per URI."""
from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from urllib.parse import urlparse

from mlflow.tracking import MlflowClient

# "Creating initial MLflow database tables..." on every new store: not for the trainer's terminal
logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)


def tracking_uri(cli: str | None = None) -> str:
    """The tracking URI: ``cli``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<abs>/mlflow.db``.

    Relative local stores (``sqlite:///runs/x.db``, ``file:mlruns``, ``mlruns``) are made absolute
    against the current directory: trial processes run in Ray's temp folders.
    """
    uri = cli or os.environ.get("MLFLOW_TRACKING_URI") or ""
    if not uri:
        return f"sqlite:///{Path('mlflow.db').resolve()}"
    return _absolute(uri)


def _absolute(uri: str) -> str:
    if uri.startswith("sqlite:///"):
        rest = uri[len("sqlite:///"):]
        path, sep, query = rest.partition("?")
        if path in ("", ":memory:") or path.startswith("/"):
            return uri
        return f"sqlite:///{Path(path).resolve()}{sep}{query}"
    scheme = urlparse(uri).scheme
    if scheme == "file":
        path = uri[len("file:"):]
        if path.startswith("//"):  # file:///abs or file://host/...
            return uri
        return Path(path).resolve().as_uri()
    if scheme == "":
        return str(Path(uri).resolve())
    return uri


def local_store_path(uri: str) -> Path | None:
    """The sqlite db file or file-store folder behind ``uri``; None for remote stores."""
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///"):].partition("?")[0]
        return None if path in ("", ":memory:") else Path(path)
    scheme = urlparse(uri).scheme
    if scheme == "file":
        return Path(urlparse(uri).path)
    if scheme == "":
        return Path(uri)
    return None


def store_missing(uri: str) -> bool:
    """True for a sqlite URI whose db file does not exist (reading must not create it)."""
    path = local_store_path(uri)
    return uri.startswith("sqlite:///") and path is not None and not path.exists()


def ui_command(uri: str) -> str:
    """The command a user runs to browse ``uri``."""
    if urlparse(uri).scheme in ("http", "https"):
        return f"open {uri}"
    return f"mlflow ui --backend-store-uri {uri}"


def ui_address(uri: str) -> str:
    """The root of the UI that shows ``uri``: the server itself, else where ``mlflow ui`` listens."""
    if urlparse(uri).scheme in ("http", "https"):
        return uri.rstrip("/") + "/"
    return "http://127.0.0.1:5000/"


@functools.lru_cache(maxsize=16)
def client(uri: str) -> MlflowClient:
    """One ``MlflowClient`` per tracking URI (with its registry at the same URI)."""
    return MlflowClient(tracking_uri=uri, registry_uri=uri)
