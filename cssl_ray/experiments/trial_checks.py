"""The checks before Ray starts that a Tune experiment's trials would otherwise fail on: the space's
resources per trial, the base config's dataset (and, for Train trials, ``ray_train.check_run``),
shared storage on a cluster and a trial's fit on this machine; one line each.
"""
from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

from cssl_ray.config import Config, ConfigError
from cssl_ray.distributed.placement import Resources, trial_demand
from cssl_ray.distributed.preflight import check_fits_here, check_shared_paths, check_worker_gpus, dataset_paths
from cssl_ray.experiments.search_space import Space
from cssl_ray.experiments.trials import say
from cssl_ray.tracking.progress import warning_text

if TYPE_CHECKING:  # torch: the CLIs import this module before their arguments are checked
    from cssl_ray.data.bundle import DataSource


def check_trials(space: Space, base: Config, *, split_varies: bool = False,
                 warned: list[str] | None = None, address: str | None = None, storage: str | None = None,
                 labelling: bool = True) -> DataSource:
    """The checks before Ray starts that a trial would otherwise fail on, one line each: the base
    config's dataset (prepared and split; also warms the cache for the trials) and, for Train trials
    (``resources.workers >= 1``), ``ray_train.check_run`` on it (workers against labelled images).
    ``split_varies``: trials change data.* (a labelled-fraction sweep), so the base's split says
    nothing about theirs; only the dataset is checked. Returns the base's ``DataSource``.

    Then the resources (``cssl_ray.distributed.preflight``): in-process trials hold no labellers; a Train trial's
    workers get at most one GPU each, and a fraction only alone; with a remote ``address`` the
    experiment folder (``storage``) and the prepared dataset are on shared storage; without one, a
    trial (its labellers when ``labelling``) fits this machine.

    ``warned``: Python warnings the checks raise (e.g. duplicate images dropped from the split) are
    printed as ``warning: <text>`` and appended, so that the experiment does not show them again
    when every trial raises them (``run_experiment(warned=...)``)."""
    check_trial_resources(space.resources)
    if warned is None:
        source = _check_trials(space, base, split_varies)
    else:
        with warnings.catch_warnings(record=True) as caught:
            source = _check_trials(space, base, split_varies)
        for w in caught:
            text = warning_text(w.message, w.category)
            if text not in warned:
                warned.append(text)
                say(f"warning: {text}")
    check_shared_paths(address, [("--storage-path", storage), *dataset_paths(base.data, source.store)])
    if address is None:
        check_fits_here(trial_demand(space.resources, labelling), "one trial",
                        "lower resources.* in the space (or --workers / --gpus-per-labeller)")
    return source


def check_trial_resources(r: Resources) -> None:
    """The space's ``resources:`` that no trial can honour, one line each (before the dataset)."""
    if r.workers == 0 and (r.labellers != 1 or r.gpus_per_labeller):
        raise ConfigError(f"resources.labellers: {r.labellers} x {r.gpus_per_labeller:g} GPU with resources.workers 0: "
                          "an in-process trial labels in its own process and its placement group has no labeller "
                          "bundles; drop resources.labellers / gpus_per_labeller (--labellers / --gpus-per-labeller), "
                          "or set resources.workers >= 1")
    if r.workers >= 1:
        check_worker_gpus(r.workers, r.gpus_per_worker, workers_key="resources.workers",
                          gpus_key="resources.gpus_per_worker")


def _check_trials(space: Space, base: Config, split_varies: bool) -> DataSource:
    r = space.resources
    if r.workers == 0 or split_varies:
        from cssl_ray.data.bundle import open_source
        return open_source(base.data)
    from cssl_ray.distributed.ray_train import check_run
    return check_run(base, workers=r.workers, gpus_per_worker=r.gpus_per_worker, cpus_per_worker=r.cpus_per_worker,
                     labellers=r.labellers, gpus_per_labeller=r.gpus_per_labeller)
