"""A local Ray instance for a test module (import it: ``from conftest_ray import local_ray``).

Follows shared/ENVIRONMENT.md: Ray's files under a private temp folder (RAY_TMPDIR, removed
afterwards), no usage stats, no token auth (which would write ~/.ray/auth_token), no dashboard, and
4 logical CPUs so Ray Data stages never wait for a CPU on a 2-core machine. Stopped with
``ray.shutdown()``, never ``ray stop`` (that kills every Ray process on the machine).
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import ray
import ray.data


@contextmanager
def ray_test_env(prefix: str = "cssl_ray_test") -> Iterator[Path]:
    """A private RAY_TMPDIR (yielded), usage stats and token auth off; all restored and removed after."""
    # /tmp, not pytest's tmp_path: Ray's unix socket paths must stay under ~107 characters.
    tmp = tempfile.mkdtemp(prefix=f"{prefix}_{os.getpid()}_", dir="/tmp")
    env = {"RAY_TMPDIR": tmp, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield Path(tmp)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def local_ray(num_cpus: int = 4, num_gpus: int = 0) -> Iterator[None]:
    """Start Ray for the duration of the block; reuse (and leave running) one already started.
    ``num_gpus``: logical GPUs (scheduling only: nothing here has CUDA)."""
    if ray.is_initialized():
        yield
        return
    with ray_test_env():
        try:
            ray.init(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False)
            ray.data.DataContext.get_current().enable_progress_bars = False
            yield
        finally:
            ray.shutdown()


# A line Ray's log monitor forwards to the driver's stderr from another process, e.g.
# "\x1b[36m(pid=gcs_server)\x1b[0m [...] Failed to ...": it can arrive at any time while Ray runs.
_RAY_FORWARDED = re.compile(r"^(\x1b\[[0-9;]*m)?\((pid=|raylet|gcs_server|autoscaler|monitor)")


def own_lines(text: str) -> list[str]:
    """The lines of captured output that this process wrote: Ray's forwarded log lines left out."""
    return [line for line in text.strip().splitlines() if not _RAY_FORWARDED.match(line)]


def descendant_processes() -> dict[int, str]:
    """pid -> command line of this process's live (non-zombie) descendants (Ray's process titles)."""
    parent: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                fields = open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()
                if fields[0] != "Z":  # zombies are dead; their parent reaps them
                    parent[int(d)] = int(fields[1])
            except (OSError, IndexError, ValueError):
                continue
    me, found = os.getpid(), {}
    for pid in parent:
        p = pid
        while p > 1 and p != me:
            p = parent.get(p, 0)
        if p == me:
            try:
                found[pid] = open(f"/proc/{pid}/cmdline").read().replace("\0", " ")
            except OSError:
                continue
    return found
