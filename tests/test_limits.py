"""One definition of each limit: every front end takes the same bounds and defaults, a
network's context is what its plan reserved (or the model's own, when shorter), and every
node reserves at least that much KV cache."""

from __future__ import annotations

import pytest
import torch
from pydantic import BaseModel

from tiktrue import limits
from tiktrue.gateway.openai_api import GenerationFields
from tiktrue.model.engine import BlockEngine
from tiktrue.model.sampling import SamplingDefaults, SamplingParams
from tiktrue.protocol.frames import decode_tensor_frame, encode_tensor_frame
from tiktrue.protocol.network_config import NetworkConfig
from tiktrue.protocol.protocol_spec import InferenceRequest
from tiktrue.service.local_network import prepare_local_network
from tiktrue.service.service_runner import NodeService

SAMPLING = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed")


def _schema(model: type[BaseModel], name: str) -> dict:
    return model.model_json_schema()["properties"][name]


def _bounds(schema: dict) -> dict:
    """A field's accepted values, whether or not it may be left out (null)."""
    accepted = [s for s in schema.get("anyOf", [schema]) if s.get("type") != "null"]
    assert len(accepted) == 1, schema
    return {k: v for k, v in accepted[0].items() if k not in ("default", "title")}


@pytest.mark.parametrize("name", SAMPLING)
def test_sampling_fields_have_one_definition(name):
    """The OpenAI API, the wire protocol and the sampler accept alike (once: temperature
    <= 2 / <= 100 then clamped to 5 / <= 5); the requests leave every field to the model."""
    expected = _bounds(_schema(SamplingParams, name))
    assert "maximum" in str(expected), expected  # bounded
    for request in (GenerationFields, InferenceRequest):
        assert _bounds(_schema(request, name)) == expected
        assert _schema(request, name)["default"] is None  # left out: the model's


def test_defaults_and_the_wire_accept_the_same_numbers():
    assert SamplingParams().temperature == limits.DEFAULT_TEMPERATURE
    assert SamplingParams() == SamplingDefaults().params()  # no model: llama.cpp's
    assert GenerationFields().sampling() == SamplingParams()
    model = SamplingDefaults(temperature=0.3, top_k=7)
    asked = GenerationFields(temperature=1.1, top_p=0.5).sampling(model)
    assert (asked.temperature, asked.top_k, asked.top_p) == (1.1, 7, 0.5)
    assert GenerationFields(stop="x" * 100).sampling().stop == ["x" * 100]  # one string
    with pytest.raises(ValueError):
        GenerationFields(stop=["x"] * (limits.MAX_STOP_STRINGS + 1))
    request = InferenceRequest(prompt="x")
    assert request.max_tokens == SamplingParams().max_tokens == limits.DEFAULT_MAX_TOKENS
    for bad in (
        {"temperature": limits.MAX_TEMPERATURE + 0.1},
        {"min_p": 1.5},
        {"input_ids": [2**31]},
    ):
        with pytest.raises(ValueError):
            InferenceRequest(prompt="x", **bad)


def test_a_frame_header_holds_the_largest_step():
    """The ids of a step travel once, in the header of the frames after the first node: the
    largest step, of the largest ids, fits the header limit."""
    ids = [limits.MAX_TOKEN_ID] * limits.MAX_STEP_TOKENS
    frame = encode_tensor_frame(
        torch.zeros(1, 1, 8), kind="forward", network_id="n" * 128, tokens=ids, timings=[{}] * 8
    )
    assert decode_tensor_frame(frame)[0]["tokens"] == ids


def _config(store, tmp_path, context: int) -> NetworkConfig:
    homes, config = prepare_local_network(tmp_path, store, nodes=2, network_id="ctx")
    return config.model_copy(update={"context_tokens": context}), homes


def test_the_context_is_the_plans_unless_the_model_is_shorter(tiny_llama, tmp_path):
    config, _ = _config(tiny_llama, tmp_path, 64)
    model = tiny_llama.config()  # max_position_embeddings 512
    assert config.context_length(model) == 64
    wide = config.model_copy(update={"context_tokens": 4096})
    assert wide.context_length(model) == model.max_position_embeddings == 512
    assert NetworkConfig.model_validate(config.model_dump()).context_tokens == 64
    with pytest.raises(ValueError):
        NetworkConfig.model_validate({**config.model_dump(), "context_tokens": 3})


@pytest.mark.parametrize("context", [64, 100])
def test_a_node_reserves_kv_for_the_whole_context(tiny_llama, tmp_path, context):
    """Even with no KV budget of its own (``--kv-budget-mb 0``), a node's span holds one
    conversation of the network's whole context; one page more does not fit."""
    config, homes = _config(tiny_llama, tmp_path, context)
    blocks = config.chain()[1].blocks
    service = NodeService(homes[1], kv_budget_mb=0, host="127.0.0.1", announce=False)
    budget = service._kv_budget(tiny_llama, config, blocks)
    from tiktrue.model.engine import Span

    engine = BlockEngine(tiny_llama, Span(tuple(blocks)), kv_budget_bytes=budget)
    hidden = torch.zeros(1, context, engine.hidden_size)
    engine.open_session("s")
    engine.forward("s", hidden, 0)  # the whole context at once
    room = -(-context // limits.KV_PAGE_TOKENS) * limits.KV_PAGE_TOKENS
    assert engine.kv.num_pages * limits.KV_PAGE_TOKENS == room
