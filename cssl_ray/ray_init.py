"""Starting Ray the one way every cssl_ray entry point does (training, prediction)."""
from __future__ import annotations

import math
import os


def init_ray(address: str | None, cpus_needed: float) -> bool:
    """Connect to ``address``, reuse this process's instance, or start a local one; True if started.

    Locally, logical CPUs are over-subscribed to cover every actor's and stage's fractional request
    plus one spare: on a 2-core machine a Ray Data stage with no CPU left waits forever
    (shared/ENVIRONMENT.md). Usage stats and token auth are off for local instances (a local
    ``ray.init`` would otherwise write ``~/.ray/auth_token``).
    """
    import ray

    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address)
        return True
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=max(os.cpu_count() or 1, math.ceil(cpus_needed) + 1))
    return True
