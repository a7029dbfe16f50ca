"""What a run and a Tune trial hold in Ray, and how many trials fit at once without deadlock.

    a Train run  Train V2 workers (the TorchTrainer's own placement group, ``workers`` bundles)
                 + the patch stream: ``labellers`` PseudoLabeller actors (a placement group of
                 their own, or bundles of the Tune trial's) and its sampling tasks (CPUs only)
    a Tune trial (workers >= 1)  its placement group [driver 0.01 CPU, one bundle per labeller]
                 + what the trial starts outside it: the Train workers' group and the sampling tasks
    a Tune trial (workers == 0)  one bundle: the run trains in the trial's own process

Labellers' GPUs come from settings only (``--gpus-per-labeller``, ``resources.gpus_per_labeller``;
default 0 = CPU labellers), never from what the cluster has: a GPU labeller waits for a GPU (an
autoscaler adds a node for it) instead of quietly running on a CPU.

Why a search cannot deadlock. Tune admits a trial when the trial's placement group fits; the trial
then asks for its Train workers' group, which Tune does not see (Train V2 creates it). If admitted
trials hold resources that each other's workers need, every trial waits forever: 2 trials on 2 GPUs
whose labellers each took a GPU leave none for either worker. So before Tune starts,
``concurrent_trials`` lowers ``max_concurrent_trials`` to the most trials that can hold ALL their
requests at once (``trials_that_fit``). Every request a running trial makes is then part of that
set, so it always finds room, whatever the order in which trials, labellers and workers arrive.
Room is counted per resource, and for GPUs per device: Ray gives a fractional GPU request a
share of ONE device (best fit), so quarters of two trials can fill one GPU and strand a 0.75
worker although the total fits (measured: labellers 0.25 + workers 0.75, 2 trials on 2 GPUs, the
second worker never starts). ``trials_that_fit`` is a bound that holds for any placement: with
every GPU request a multiple of a unit ``u`` (0.25 for quarters, 1 for whole GPUs), a request of
``s`` can only fail when every one of the ``G`` devices holds more than ``1 - s``, i.e. at least
``1 - s + u``; so it always fits if all other requests together are below ``G (1 - s + u)``, or
if they are too few to touch every device.
Halves (0.5 + 0.5) pass for 2 trials on 2 GPUs; quarters with 0.75 do not (1 trial at a time).
CPUs are one pool per node; the sum is the bound. It is exact on one node (a local instance); on a
cluster of several nodes a bundle's CPUs must also be on its GPU's node, so give nodes CPUs in
proportion to their GPUs. A trial that cannot fit a local instance at all (which cannot grow) is a
one-line ``ConfigError`` before Tune starts; on a cluster given by address the trials run one at a
time, each queued until the autoscaler adds nodes.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from cssl_ray.config import ConfigError


@dataclass
class Resources:
    """A space's ``resources:`` block: what one trial asks of the cluster."""
    workers: int = 1  # Ray Train workers per trial; 0 = the trial trains in-process
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    labellers: int = 1  # pseudo-labeller actors per Train trial, in the trial's placement group
    gpus_per_labeller: float = 0.0  # 0 = CPU labellers (the default); a fraction up to 1 shares a GPU



TRIAL_DRIVER_CPUS = 0.01  # the trial's own process (shared/ENVIRONMENT.md: Tune + Train V2 deadlock otherwise)


@dataclass(frozen=True)
class StreamResources:
    """Ray resources of the patch stream's stages (``cssl_ray.distributed.stream``).

    Fractional CPUs keep a 2-CPU machine from hanging, but on their own they let Ray run 1 / 0.25
    tasks per CPU, each in a fresh worker process that imports torch (Ray warned of 8 workers
    started at once, and the stream ran slower); ``samplers`` caps the concurrent tasks instead.
    """

    labellers: int = 1  # PseudoLabeller actors (a fixed set: their CPUs are held all run)
    labeller_cpus: float = 0.5  # CPUs each labeller holds for its lifetime
    labeller_gpus: float = 0.0  # GPUs each labeller holds: 0 = CPU labellers (the default), up to 1;
    #                             a fraction shares a GPU (with a Train worker: e.g. 0.5 each)
    samplers: int = 2  # most concurrent stream tasks per rank (at least 2 per labeller: see tasks_per_rank)
    sampler_cpus: float = 0.25  # CPUs per stream task (labelling a step through the pool, sampling its patches)

    def tasks_per_rank(self) -> int:
        """Concurrent tasks of one rank's step stream: ``samplers``, and at least 2 per labeller (one
        step labelling, the next queued at the actor)."""
        return max(self.samplers, 2 * self.labellers)

    def sampler_cpus_held(self, workers: int) -> float:
        """CPUs the stream tasks of ``workers`` ranks hold at once (tasks: in no placement group)."""
        return workers * self.tasks_per_rank() * self.sampler_cpus

    def cpus(self, workers: int) -> float:
        """Logical CPUs the labelling may hold at once: the labellers, and every rank's stream tasks."""
        return self.labellers * self.labeller_cpus + self.sampler_cpus_held(workers)

    def labeller_bundles(self) -> list[dict[str, float]]:
        """One placement-group bundle per labeller: ``{"CPU": labeller_cpus[, "GPU": labeller_gpus]}``."""
        return [_bundle(self.labeller_cpus, self.labeller_gpus) for _ in range(self.labellers)]


@dataclass(frozen=True)
class Demand:
    """What one run or trial holds at once: CPUs (a pool) and each GPU request on its own (a
    bundle or an actor; a fractional request must fit on one device)."""

    cpus: float
    gpus: tuple[float, ...] = ()  # the GPUs of each request that asks for any
    parts: str = ""  # what the numbers are made of, for messages

    def __str__(self) -> str:
        return f"{self.cpus:g} CPU and {sum(self.gpus):g} GPU" + (f" ({self.parts})" if self.parts else "")


def _bundle(cpus: float, gpus: float) -> dict[str, float]:
    return {"CPU": cpus, **({"GPU": gpus} if gpus else {})}


def _plural(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


def stream_resources(resources: Resources) -> StreamResources:
    """A space's ``resources:`` labeller settings as the stream's resources (the rest: defaults)."""
    return StreamResources(labellers=resources.labellers, labeller_gpus=resources.gpus_per_labeller)


def run_demand(workers: int, cpus_per_worker: float, gpus_per_worker: float,
               stream: StreamResources | None) -> Demand:
    """A Train run: its workers, and with a patch stream (``stream``; None = no CL/CR, so no
    stream) its labellers and sampling tasks."""
    cpus, gpus = workers * cpus_per_worker, [gpus_per_worker] * workers if gpus_per_worker else []
    parts = [f"{_plural(workers, 'Train worker')} x {cpus_per_worker:g} CPU" + (f" + {gpus_per_worker:g} GPU"
                                                                               if gpus_per_worker else "")]
    if stream is not None:
        cpus += stream.cpus(workers)
        gpus += [stream.labeller_gpus] * stream.labellers if stream.labeller_gpus else []
        parts.append(f"{_plural(stream.labellers, 'labeller')} x {stream.labeller_cpus:g} CPU"
                     + (f" + {stream.labeller_gpus:g} GPU" if stream.labeller_gpus else ""))
        parts.append(f"step streams {stream.sampler_cpus_held(workers):g} CPU")
    return Demand(cpus, tuple(gpus), ", ".join(parts))


def trial_bundles(resources: Resources, labelling: bool) -> list[dict[str, float]]:
    """The bundles of a Tune trial's placement group (``tune.PlacementGroupFactory``).

    In-process trials (``workers == 0``): one bundle, the run itself. Train trials: the driver's
    ``TRIAL_DRIVER_CPUS``, then one bundle per labeller when trials pseudo-label (``labelling``);
    ``pipeline.LabellerPool`` puts its actors into the group's last bundles. The Train workers are
    not here: Train V2 places them in a group of its own (see ``trial_demand``).
    """
    r = resources
    if r.workers == 0:
        return [_bundle(r.cpus_per_worker, r.gpus_per_worker)]
    labellers = stream_resources(r).labeller_bundles() if labelling else []
    return [{"CPU": TRIAL_DRIVER_CPUS}, *labellers]


def trial_demand(resources: Resources, labelling: bool) -> Demand:
    """Everything one trial holds at once: its placement group, and what it starts outside it
    (the Train workers' group and the sampling tasks)."""
    r = resources
    if r.workers == 0:
        return Demand(r.cpus_per_worker, (r.gpus_per_worker,) if r.gpus_per_worker else (),
                      "the run in the trial's process")
    run = run_demand(r.workers, r.cpus_per_worker, r.gpus_per_worker, stream_resources(r) if labelling else None)
    return Demand(TRIAL_DRIVER_CPUS + run.cpus, run.gpus, f"driver {TRIAL_DRIVER_CPUS:g} CPU, {run.parts}")


def fits(demand: Demand, trials: int, cpus: float, gpus: float) -> bool:
    """Whether ``trials`` copies of ``demand`` fit ``cpus`` and ``gpus`` devices in ANY placement
    (see the module docstring: the per-device bound for GPUs, the sum for CPUs)."""
    if trials * demand.cpus > cpus + 1e-9:
        return False
    # Ray's resource precision is 1e-4; a request above 1 GPU takes whole devices
    items = [Fraction(math.ceil(g)) if g > 1 else Fraction(g).limit_denominator(10_000) for g in demand.gpus] * trials
    if not items:
        return True
    devices = int(gpus + 1e-9)
    lcm = math.lcm(*(f.denominator for f in items))  # every item and 1 as a whole number of 1/lcm
    unit = Fraction(math.gcd(lcm, *(int(f * lcm) for f in items)), lcm)  # the largest u they are all multiples of
    total, touched = sum(items), sum(math.ceil(f) for f in items)  # GPUs and devices the requests take at most
    for s in set(items):
        # A request of s <= 1 fails only if every device holds >= 1 - s + unit (so none is empty);
        # one of s whole devices only if >= devices - s + 1 devices are not empty, each holding
        # >= unit. Either needs the OTHER requests to hold that much, or to touch that many devices.
        busy = devices if s <= 1 else devices - s + 1  # non-empty devices a failure needs
        room = devices * (1 - s + unit) if s <= 1 else busy * unit  # GPUs a failure needs held
        if not (total - s < room or touched - math.ceil(s) < busy):
            return False
    return True


def trials_that_fit(demand: Demand, cpus: float, gpus: float, most: int) -> int:
    """The most trials, up to ``most``, that can hold all their resources at once (0: not even one)."""
    k = 0
    while k < most and fits(demand, k + 1, cpus, gpus):
        k += 1
    return k


def concurrent_trials(most: int, demand: Demand, cluster: Mapping[str, float], can_grow: bool,
                      log: Callable[[str], None]) -> int:
    """``max_concurrent_trials`` for Tune: ``most`` (the space's), lowered to what ``cluster``
    (``ray.cluster_resources()``) holds without deadlock, with one line saying so.

    A trial that does not fit at all: a ``ConfigError`` when the cluster cannot grow (a local
    instance); else 1 at a time, each queued until the autoscaler adds nodes (the cluster's size
    now says nothing about its size then, and one trial at a time cannot deadlock).
    """
    cpus, gpus = cluster.get("CPU", 0.0), cluster.get("GPU", 0.0)
    have = f"{cpus:g} CPU and {gpus:g} GPU"
    k = trials_that_fit(demand, cpus, gpus, most)
    if k == 0 and not can_grow:
        raise ConfigError(f"resources: one trial needs {demand}, more than this Ray instance has ({have}), and a "
                          "local instance cannot grow; lower resources.* in the space, or pass --address of a "
                          "cluster that has them")
    if k == 0:
        log(f"resources: one trial needs {demand}; the cluster has {have} now: trials run one at a time, "
            "each waiting (queued) for the autoscaler to add nodes")
        return 1
    if k < most:
        log(f"resources: {k} trial(s) at a time, not max_concurrent_trials {most}: each trial needs {demand}, "
            f"Train workers included, and {k + 1} would not surely fit {have} (more would deadlock)")
    return k


def check_labeller_flags(labellers: int, gpus_per_labeller: float) -> None:
    """``--labellers`` / ``--gpus-per-labeller`` (train, tune, ablate): one-line ConfigErrors."""
    if labellers < 1:
        raise ConfigError(f"--labellers: {labellers} is out of range; allowed: >= 1 (pseudo-labeller actors)")
    if not 0 <= gpus_per_labeller <= 1:
        raise ConfigError(f"--gpus-per-labeller: {gpus_per_labeller:g} is out of range; allowed: 0 (CPU labellers) "
                          "to 1 (a fraction shares a GPU)")


def check_run_fits(demand: Demand, cluster: Mapping[str, float]) -> None:
    """A ``ConfigError`` when one run cannot fit a local Ray instance (it cannot grow; the run
    would wait forever)."""
    cpus, gpus = cluster.get("CPU", 0.0), cluster.get("GPU", 0.0)
    if not fits(demand, 1, cpus, gpus):
        raise ConfigError(f"the run needs {demand}, more than this Ray instance has ({cpus:g} CPU and {gpus:g} GPU), "
                          "and a local instance cannot grow; lower --gpus-per-worker / --gpus-per-labeller, or "
                          "pass --address of a cluster that has them")


def labeller_group(stream: StreamResources, log: Callable[[str], None], wait_s: float = 10.0,
                   timeout_s: float | None = None) -> Any:
    """A placement group of ``stream.labeller_bundles()``, once Ray has placed it.

    Waits as long as it takes (an autoscaler adds the nodes), saying so once after ``wait_s``;
    ``timeout_s``: raise ``TimeoutError`` instead (the group is removed).
    """
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    group = placement_group(stream.labeller_bundles(), strategy="PACK")
    if group.wait(timeout_seconds=wait_s):
        return group
    bundles = stream.labeller_bundles()
    log(f"[cssl_ray] waiting for the labellers' resources ({_plural(len(bundles), 'bundle')} of {bundles[0]}): "
        "queued until the cluster has them free (an autoscaler adds nodes)")
    ready, _ = ray.wait([group.ready()], timeout=timeout_s)
    if not ready:
        remove_placement_group(group)
        raise TimeoutError(f"the labellers' placement group was not placed in {wait_s + (timeout_s or 0):g} s")
    return group
