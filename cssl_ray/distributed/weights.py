"""How the latest model weights reach the Ray Data pseudo-labellers.

    WeightStore                 a small named Ray actor: the latest CPU state dict and its version
    get_or_create_weight_store  create it by name, or get the one that already exists
    publish_weights             copy a model's weights to CPU and publish them (the trainer calls it)
    WeightsClient               per-actor cache: reads the version per batch, reloads only on change

A version names one set of weights: the trainer publishes the model of round r - 1 as version r
before the pipeline of round r runs. Versions only go up, so a stale publisher cannot roll the
labellers back, with one exception: a Train worker restarted from an older checkpoint (a failure
after round 3's publish, a restart from round 1's checkpoint) republishes its rounds from there,
with ``restart=True``. That starts a new generation: a client reloads whenever (generation,
version) changes, so the labellers never keep the failed attempt's weights of a version number
the restarted run publishes again.

Lifetime: the store lives as long as the process that created it (a non-detached actor). Create it
in the driver, which outlives restarted Train workers, not in a worker; ``pipeline.LabellerPool``,
whose actors read it, lives there too.
"""
from __future__ import annotations

from typing import Any

import ray
import torch
from torch import nn

StateDict = dict[str, torch.Tensor]


@ray.remote(num_cpus=0)  # never holds a CPU slot: on a 2-CPU machine every slot is budgeted
class WeightStore:
    """The latest state dict and its integer version (-1 until the first publish)."""

    def __init__(self) -> None:
        self._version = -1
        self._generation = 0  # bumped by every restart publish
        self._state: StateDict | None = None

    def publish(self, state_dict: StateDict, version: int, restart: bool = False) -> int:
        """Hold ``state_dict`` as ``version``; ``restart``: the publisher resumed from an older
        checkpoint, so the version may go down (a new generation starts)."""
        if isinstance(version, bool) or not isinstance(version, int) or version < 0:
            raise ValueError(f"version must be an integer >= 0, got {version!r}")
        if version < self._version and not restart:
            raise ValueError(f"version {version} is older than the published version {self._version} "
                             "(a worker restarted from an older checkpoint publishes with restart=True)")
        if restart:
            self._generation += 1
        self._state, self._version = state_dict, version
        return version

    def version(self) -> int:
        return self._version

    def stamp(self) -> tuple[int, int]:
        """(generation, version): what a client's cache is keyed by."""
        return self._generation, self._version

    def get(self, min_version: int | None = None) -> tuple[int, StateDict]:
        if self._state is None:
            raise RuntimeError("no weights published yet")
        if min_version is not None and self._version < min_version:
            raise RuntimeError(f"weights are version {self._version}, older than the required {min_version}")
        return self._version, self._state


def get_or_create_weight_store(name: str, namespace: str | None = None) -> ray.actor.ActorHandle:
    """The ``WeightStore`` called ``name`` (in ``namespace``; default the job's), created if absent."""
    return WeightStore.options(name=name, namespace=namespace, get_if_exists=True).remote()


def cpu_state_dict(model: nn.Module) -> StateDict:
    """Detached CPU copy of ``model``'s state dict; a DDP wrapper is unwrapped (no ``module.`` keys)."""
    model = getattr(model, "module", model)
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def publish_weights(store: ray.actor.ActorHandle | str, model: nn.Module, version: int, restart: bool = False) -> int:
    """Publish ``model``'s weights as ``version`` and wait until the store holds them (``restart``:
    the first publish of a worker resumed from a checkpoint; see the module docstring)."""
    if isinstance(store, str):
        store = ray.get_actor(store)
    return ray.get(store.publish.remote(cpu_state_dict(model), version, restart))


class WeightsClient:
    """Client-side cache of the store's weights, for use inside ``map_batches`` actors.

    ``latest(model)`` costs one small actor call per batch (the version); the state dict crosses the
    object store only when the version changed since the last load.
    """

    def __init__(self, name: str, namespace: str | None = None) -> None:
        self.name, self.namespace = name, namespace
        self.version = -1  # version loaded into the model; -1 = none yet
        self._stamp: tuple[int, int] | None = None  # (generation, version) loaded
        self._store: Any = None

    @property
    def store(self) -> ray.actor.ActorHandle:
        if self._store is None:  # looked up lazily: the client may be built before the store exists
            try:
                self._store = ray.get_actor(self.name, namespace=self.namespace)
            except ValueError:
                raise RuntimeError(f"no weight store named {self.name!r}; create it with "
                                   "get_or_create_weight_store before running the pipeline") from None
        return self._store

    def store_version(self) -> int:
        return ray.get(self.store.version.remote())

    def latest(self, model: nn.Module, min_version: int | None = None) -> int:
        """Load the newest weights into ``model`` if they changed; return their version."""
        generation, current = ray.get(self.store.stamp.remote())
        if current < 0:
            raise RuntimeError(f"weight store {self.name!r} has no weights yet; publish before iterating")
        if min_version is not None and current < min_version:
            raise RuntimeError(f"weight store {self.name!r} holds version {current}, older than the required "
                               f"{min_version}: publish the new round's weights before iterating")
        if (generation, current) != self._stamp:  # a new version, or the same number republished by a restart
            version, state = ray.get(self.store.get.remote(min_version))
            model.load_state_dict(state)
            # the stamp read before the weights: a publish in between makes the next call reload again
            self.version, self._stamp = version, (generation, current)
        return self.version
