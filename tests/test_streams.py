"""Random streams: one generator per purpose, seeded from (seed, purpose, rank)."""
from __future__ import annotations

import pytest
import torch

from cssl_ray.method.streams import PURPOSES, SHARED, RandomStreams, stream_seed


def test_streams_are_distinct_reproducible_and_per_rank():
    a, b = RandomStreams(3), RandomStreams(3)
    draws = {p: torch.rand(4, generator=a[p]) for p in PURPOSES}
    assert all(torch.equal(draws[p], torch.rand(4, generator=b[p])) for p in PURPOSES)  # same seed, same draws
    assert len({tuple(v.tolist()) for v in draws.values()}) == len(PURPOSES)  # purposes differ
    assert stream_seed(3, "sup", 0) != stream_seed(3, "sup", 1) != stream_seed(4, "sup", 0)


def test_shared_purposes_draw_the_same_on_every_rank():
    # alpha, aux and omega act on the all-gathered contrastive batch: every rank must draw rank 0's values
    r0, r1 = RandomStreams(3, rank=0), RandomStreams(3, rank=1)
    for p in PURPOSES:
        same = torch.equal(torch.rand(4, generator=r0[p]), torch.rand(4, generator=r1[p]))
        assert same == (p in SHARED), p


def test_drawing_from_one_stream_leaves_the_others_alone():
    a, b = RandomStreams(0), RandomStreams(0)
    torch.rand(1000, generator=a.patches)  # e.g. a cell that samples patches
    assert torch.equal(torch.rand(5, generator=a.sup), torch.rand(5, generator=b.sup))


def test_state_round_trip_and_errors():
    a = RandomStreams(1)
    state = a.state_dict()
    first = torch.rand(3, generator=a.noise)
    a.load_state_dict(state)
    assert torch.equal(torch.rand(3, generator=a.noise), first)
    with pytest.raises(ValueError, match="lacks"):
        a.load_state_dict({"sup": state["sup"]})
    with pytest.raises(KeyError, match="no random stream"):
        a["nope"]
