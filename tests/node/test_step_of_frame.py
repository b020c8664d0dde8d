"""``step_of_frame``: a frame's header checked into an immutable ``Step`` (here its class)."""

from __future__ import annotations

import pytest
import torch

from tiktrue import limits
from tiktrue.node.chain_hop import step_of_frame
from tiktrue.protocol import protocol_spec as ps


def header(**extra) -> dict:
    base = {"kind": "forward", "network_id": "n", "session_id": "s", "message_id": "m"}
    return {**base, "start": 0, **extra}


def step(**extra):
    return step_of_frame(header(**extra), torch.tensor([1, 2]), "n", has_embed=True, head=False)


def test_a_steps_class_comes_from_its_header_and_defaults_to_normal():
    assert step().priority == limits.PRIORITY_RANK["normal"]
    for name, rank in limits.PRIORITY_RANK.items():
        assert step(priority=name).priority == rank


@pytest.mark.parametrize("wrong", ["urgent", 1, ["quick"], {"a": 1}, ""])
def test_a_wrong_class_is_refused_before_it_reaches_the_worker(wrong):
    with pytest.raises(ps.ProtocolError) as refused:
        step(priority=wrong)
    assert refused.value.code == ps.INVALID_MESSAGE
    assert "quick, normal, deep" in refused.value.message
