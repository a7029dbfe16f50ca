"""A local Ray instance for a test module (import it: ``from conftest_ray import local_ray``).

Follows shared/ENVIRONMENT.md: Ray's files under a private temp folder (RAY_TMPDIR, removed
afterwards), no usage stats, no token auth (which would write ~/.ray/auth_token), no dashboard, and
4 logical CPUs so Ray Data stages never wait for a CPU on a 2-core machine. Stopped with
``ray.shutdown()``, never ``ray stop`` (that kills every Ray process on the machine).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

import ray
import ray.data


@contextmanager
def local_ray(num_cpus: int = 4) -> Iterator[None]:
    """Start Ray for the duration of the block; reuse (and leave running) one already started."""
    if ray.is_initialized():
        yield
        return
    # /tmp, not pytest's tmp_path: Ray's unix socket paths must stay under ~107 characters.
    tmp = tempfile.mkdtemp(prefix=f"cssl_ray_test_{os.getpid()}_", dir="/tmp")
    env = {"RAY_TMPDIR": tmp, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        ray.init(num_cpus=num_cpus, include_dashboard=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        yield
    finally:
        ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(tmp, ignore_errors=True)
