"""Resource settings checked before Ray starts: each bad one is a one-line ``ConfigError`` (rc 2),
never a Train run that hangs, a NCCL error on the first all-reduce, or a node that cannot read a path.

- ``check_worker_gpus``: a rank trains on one device (no more than 1 GPU per worker), and ranks
  never share one (NCCL refuses two ranks on a GPU), so a fractional GPU needs ``workers == 1``.
- ``check_shared_paths``: with ``--address`` of a remote cluster (``ray://host``, or ``host:port``
  of another machine), a path on this machine's own disk (run folders, the prepared dataset) is
  invisible to the cluster's other nodes; give an ``s3://`` / ``gs://`` URI or a folder on a network
  file system mounted at the same path on every node. ``auto`` and local addresses are not checked
  (the cluster may be this machine alone), nor is a path whose file system cannot be read here. A
  local dataset cache is refused only where a node could not prepare its own (``dataset_paths``).
- ``check_fits_here``: a Ray instance started here (no ``--address``) cannot grow, so a run or a
  trial that needs more GPUs than this machine has (labellers included) would wait forever.
"""
from __future__ import annotations

import socket
from collections.abc import Iterable, Mapping
from pathlib import Path

from cssl_ray.config import ConfigError, DataConfig
from cssl_ray.distributed.placement import Demand, fits

# file systems every node of a cluster can mount at one path (``fuse.*``: sshfs, gcsfuse, s3fs, ...)
NETWORK_FILE_SYSTEMS = frozenset({"nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "beegfs", "glusterfs",
                                  "ceph", "cephfs", "afs", "panfs", "wekafs", "9p", "virtiofs", "fuse"})
MOUNTS = Path("/proc/mounts")


def check_worker_gpus(workers: int, gpus_per_worker: float, *, workers_key: str = "--workers",
                      gpus_key: str = "--gpus-per-worker") -> None:
    """More than one GPU per rank, or a fraction of one with more than one rank: one line naming the key."""
    if gpus_per_worker > 1:
        raise ConfigError(f"{gpus_key}: {gpus_per_worker:g} is more than one GPU, but a rank trains on one device; "
                          f"allowed: 0 (CPU) to 1 (for N GPUs use {workers_key} N)")
    if workers > 1 and 0 < gpus_per_worker < 1:
        raise ConfigError(f"{gpus_key}: {gpus_per_worker:g} with {workers_key} {workers} would put two ranks on one "
                          f"GPU, which NCCL refuses; allowed: 1 per worker with {workers_key} > 1 (a fraction only "
                          f"with {workers_key} 1, e.g. to share the GPU with a labeller)")


def is_remote_address(address: str | None) -> bool:
    """Whether ``address`` names a Ray cluster on another machine (``ray://host[:port]`` or
    ``host:port`` whose host is not this machine). ``None``, ``auto`` and ``local``: no."""
    if not address or address in ("auto", "local"):
        return False
    host = address.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    return not is_this_machine(host)


def is_this_machine(host: str) -> bool:
    """Whether ``host`` is this machine: a loopback or local name, or an address the kernel would
    send from to reach it (a UDP ``connect`` sends nothing; it only picks the route)."""
    if host in ("", "localhost", "0.0.0.0", "::1", socket.gethostname(), socket.getfqdn()) or host.startswith("127."):
        return True
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_DGRAM)
    except OSError:  # not resolvable here: not a name of this machine
        return False
    for family, _, _, _, sockaddr in infos:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            try:
                s.connect((sockaddr[0], 9))
                if s.getsockname()[0] == sockaddr[0]:
                    return True
            except OSError:  # no route: not this machine
                continue
    return False


def file_system(path: str | Path, mounts: Path = MOUNTS) -> str | None:
    """The type of the file system that holds ``path`` (the longest mount point above it in
    ``/proc/mounts``); None where that cannot be read (not Linux)."""
    try:
        lines = mounts.read_text().splitlines()
    except OSError:
        return None
    target = str(Path(path).expanduser().resolve())
    best, kind = "", None
    for line in lines:
        parts = line.split()
        if len(parts) < 3:
            continue
        point = parts[1].replace("\\040", " ")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, parts[2]
    return kind


def is_shared(kind: str) -> bool:
    return kind in NETWORK_FILE_SYSTEMS or kind.startswith("fuse.")


def check_shared_paths(address: str | None, paths: Iterable[tuple[str, str | None]],
                       mounts: Path = MOUNTS) -> None:
    """With a remote ``address``: every (key, path) that is a folder on this machine's own disk is
    a one-line error naming the key (URIs and network file systems pass)."""
    if not is_remote_address(address):
        return
    for key, path in paths:
        if not path or "://" in str(path):
            continue
        kind = file_system(path, mounts)
        if kind is None or is_shared(kind):
            continue
        raise ConfigError(f"{key}: {path} is on this machine's own disk ({kind}), which the nodes of the cluster at "
                          f"--address {address} cannot read; give shared storage: an s3:// or gs:// URI, or a folder "
                          "on a network file system mounted at the same path on every node")


def dataset_paths(data: DataConfig, store: str | None) -> list[tuple[str, str | None]]:
    """The dataset paths a remote node must be able to read, for ``check_shared_paths``: none for
    synthetic, nuclei and nuclei_tiles (a node without the driver's store prepares its own: the set fetches itself)
    or a store behind a URI; else the prepared store, unless the raw files (``data.root``) are on
    shared storage (then a node without the store prepares its own from them; cluster/README.md)."""
    from cssl_ray.data.sources import WHEEL_FORMATS, default_root
    if store is None or data.name in WHEEL_FORMATS or "://" in store:  # (those cards' names are their formats)
        return []
    kind = file_system(data.root or default_root(data.name))
    return [] if kind is not None and is_shared(kind) else [("data.cache_dir", store)]


def local_resources() -> Mapping[str, float]:
    """What a Ray instance started here holds: CPUs without bound (``ray_init.init_ray``
    over-subscribes logical CPUs to cover every request), and the CUDA devices torch sees (as Ray
    does, through ``CUDA_VISIBLE_DEVICES``)."""
    import torch

    return {"CPU": float("inf"), "GPU": float(torch.cuda.device_count())}


def check_fits_here(demand: Demand, what: str, fix: str, resources: Mapping[str, float] | None = None) -> None:
    """``demand`` (one run, or one trial) against this machine (``local_resources``): one line if it
    can never fit a Ray instance started here."""
    have = resources if resources is not None else local_resources()
    if not fits(demand, 1, have.get("CPU", 0.0), have.get("GPU", 0.0)):
        raise ConfigError(f"{what} needs {demand}, but this machine has {have.get('GPU', 0.0):g} GPU and a Ray "
                          f"instance started here cannot grow; {fix}, or pass --address of a cluster that has them")
