"""Starting and stopping Ray the one way every cssl_ray entry point does (training, prediction, Tune).

Several Ray instances on one machine (two experiments started side by side, or another engineer's)
are fine as long as nothing has to guess which one it belongs to. Ray code that looks up "the"
cluster without an address does guess: Ray Train V2's PlacementGroupCleaner (a detached actor
every Train run starts) asks the state API about its controller every second through
``ray.util.state.get_actor`` with no address, which auto-detects running GCS processes and raises
``ConnectionError: Found multiple active Ray instances`` when there are two, once a second, for the
whole run. ``RAY_ADDRESS`` is what that lookup reads first; ``init_ray`` sets it, for the processes
of the instance it starts or joins and for the driver, to that instance's address.

A quiet terminal (the default; ``--verbose`` / ``set_verbose(True)`` turns it off): what Ray's
processes print (raylet and core_worker lines, Ray Train's reports, Ray Data's progress bars, a
worker's own deprecation warnings) stays in Ray's log files (``<RAY_TMPDIR>/session_*/logs``, by
default /tmp/ray); of the lines forwarded to the driver only the project's (``[cssl_ray] ...``), the
warnings other than deprecations and the one-line summaries of errors (``ValueError: ...``) reach
the terminal, and Ray's own loggers on the driver show warnings and errors only.
"""
from __future__ import annotations

import logging
import math
import os
import re
import socket
import warnings

from cssl_ray.tracking.progress import ERROR_LINE

_ADDRESS = "RAY_ADDRESS"
VERBOSE_ENV = "CSSL_RAY_VERBOSE"  # "1": Ray's own output reaches the terminal (set_verbose, --verbose)
# The forwarded lines of Ray's processes a quiet terminal shows: the project's own, a warning that is
# not a deprecation, and (shown_line) an error's summary line (progress.ERROR_LINE).
_SHOWN = re.compile(r"\[cssl_ray\]|(?<!Deprecation)Warning: ")
_filtering = [False]  # whether the driver's printer of Ray's lines filters them now (init_ray, shutdown_ray)
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
    experiments use it and print their own lines (``cssl_ray.tracking.progress``). Either way a
    quiet terminal (module docstring) shows only the project's lines; ``is_verbose()`` forwards
    everything, whatever ``log_to_driver`` says.
    """
    import ray

    if ray.is_initialized():
        return False
    verbose = is_verbose()
    filtered = not verbose and _filter_forwarded()
    quiet = {} if verbose else {"log_to_driver": log_to_driver and filtered, "logging_level": logging.WARNING}
    _filtering[0] = filtered
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
    _filtering[0] = False
    if _saved_address:
        _restore(_ADDRESS, _saved_address.pop())


def set_verbose(on: bool) -> None:
    """The CLIs' ``--verbose``: Ray's output as Ray prints it (``on``), else a quiet terminal (module
    docstring; this process's deprecation warnings are ignored too). In the environment, so that a
    ``python -m`` child and Ray's local processes see it."""
    os.environ[VERBOSE_ENV] = "1" if on else "0"
    if not on:
        for category in (DeprecationWarning, PendingDeprecationWarning):
            warnings.filterwarnings("ignore", category=category)
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"(ray|torch|pyarrow|pandas)(\.|$)")


def is_verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "0").lower() in ("1", "true", "yes")


def shown_line(line: str) -> bool:
    """Whether a quiet terminal shows this line a Ray process printed (module docstring)."""
    return bool(_SHOWN.search(line) or ERROR_LINE.match(line.strip()))


def _filter_forwarded() -> bool:
    """Route what Ray's driver prints for other processes (their forwarded lines, and the raylet's
    messages, e.g. "(raylet) WARNING: 8 PYTHON worker processes have been started ...") through
    ``shown_line`` while ``_filtering`` says so; False where this Ray has no such printer (a private
    API, ``ray._private.worker.print_to_stdstream``: then a quiet driver forwards nothing). Installed
    before ``ray.init``, which binds the printer of forwarded lines when it connects."""
    try:
        from ray._private import worker
    except ImportError:
        return False
    show = getattr(worker, "print_to_stdstream", None)
    if show is None:
        return False
    if not getattr(show, "cssl_filter", False):
        def shown_only(data: dict, *args, **kwargs) -> None:
            if _filtering[0]:
                lines = [line for line in data.get("lines", []) if shown_line(str(line))]
                if not lines:
                    return
                data = {**data, "lines": lines}
            show(data, *args, **kwargs)

        shown_only.cssl_filter = True
        worker.print_to_stdstream = shown_only
    return True


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
