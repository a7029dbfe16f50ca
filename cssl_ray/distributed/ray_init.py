"""Starting and stopping Ray the one way every cssl_ray entry point does (training, prediction, Tune).

Several Ray instances on one machine (two experiments started side by side, or another engineer's)
are fine as long as nothing has to guess which one it belongs to. Ray code that looks up "the"
cluster without an address does guess: Ray Train V2's PlacementGroupCleaner (a detached actor
every Train run starts) asks the state API about its controller every second through
``ray.util.state.get_actor`` with no address, which auto-detects running GCS processes and raises
``ConnectionError: Found multiple active Ray instances`` when there are two, once a second, for the
whole run. ``RAY_ADDRESS`` is what that lookup reads first; ``init_ray`` sets it, for the processes
of the instance it starts or joins and for the driver, to that instance's address.
"""
from __future__ import annotations

import logging
import math
import os
import socket

_ADDRESS = "RAY_ADDRESS"
_saved_address: list[str | None] = []  # the driver's RAY_ADDRESS before init_ray pinned it


def init_ray(address: str | None, cpus_needed: float, *, log_to_driver: bool = True) -> bool:
    """Connect to ``address``, reuse this process's instance, or start a local one; True if started
    (or connected): then stop it with ``shutdown_ray``.

    Locally, logical CPUs are over-subscribed to cover every actor's and stage's fractional request
    plus one spare: on a 2-core machine a Ray Data stage with no CPU left waits forever
    (shared/ENVIRONMENT.md). Usage stats and token auth are off for local instances (a local
    ``ray.init`` would otherwise write ``~/.ray/auth_token``). A local instance's GCS port is chosen
    here, so that its address can be pinned in its own processes' ``RAY_ADDRESS`` (module docstring).

    ``log_to_driver=False``: what Ray's worker processes print (trials, Train workers, Ray Data
    tasks) stays in Ray's log files (``<RAY_TMPDIR>/session_*/logs``) instead of reaching this
    terminal with a ``(pid=...)`` prefix, and Ray's own INFO lines on the driver are off; Tune
    experiments use it and print their own lines (``cssl_ray.tracking.progress``).
    """
    import ray

    if ray.is_initialized():
        return False
    quiet = {} if log_to_driver else {"log_to_driver": False, "logging_level": logging.WARNING}
    if address:
        pinned = address if ":" in address and "://" not in address else None  # host:port; not auto, ray://
        ray.init(address=address, runtime_env=_env(pinned), **quiet)
        _pin(ray.get_runtime_context().gcs_address)
        return True
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    cpus = max(os.cpu_count() or 1, math.ceil(cpus_needed) + 1)
    port = _free_port()
    gcs = f"{ray.util.get_node_ip_address()}:{port}"
    saved_port = os.environ.get("RAY_GCS_SERVER_PORT")
    os.environ["RAY_GCS_SERVER_PORT"] = str(port)  # read once, by the head node's start (ray._private.node)
    try:
        # "local": start one even where RAY_ADDRESS names another (an outer experiment's, a user's)
        ray.init(address="local", num_cpus=cpus, runtime_env=_env(gcs), **quiet)
    finally:
        _restore("RAY_GCS_SERVER_PORT", saved_port)
    _pin(ray.get_runtime_context().gcs_address)
    return True


def shutdown_ray() -> None:
    """``ray.shutdown()`` and the driver's ``RAY_ADDRESS`` as it was before ``init_ray``."""
    import ray

    ray.shutdown()
    if _saved_address:
        _restore(_ADDRESS, _saved_address.pop())


def _env(gcs: str | None) -> dict | None:
    """The job's runtime env: every task and actor of it (detached ones too) gets RAY_ADDRESS."""
    return {"env_vars": {_ADDRESS: gcs}} if gcs else None


def _pin(gcs: str) -> None:
    if not _saved_address:
        _saved_address.append(os.environ.get(_ADDRESS))
    os.environ[_ADDRESS] = gcs


def _restore(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def _free_port() -> int:
    """A TCP port free now (the OS's pick). Another process may take it before the GCS binds it: then
    ``ray.init`` fails with a clear error; the window is the GCS's start, well under a second."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]
