"""A chain of three real node processes: correctness, protocol, errors, TLS, sessions."""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl

import pytest
import torch
import websockets

from tests.helpers.cluster import (
    ask,
    client_ws_url,
    direct_answer_usage,
    network_infos,
    node_connection,
    request,
    token_ids,
)
from tiktrue.model.engine import BlockEngine, split_evenly
from tiktrue.model.generation import GenerationResult, LocalChain, stream_tokens
from tiktrue.model.sampling import SamplingParams
from tiktrue.model.tokenizer import load_tokenizer
from tiktrue.protocol import protocol_spec as ps
from tiktrue.protocol.frames import encode_tensor_frame
from tiktrue.security.auth_manager import create_network_ca
from tiktrue.security.crypto_layer import client_ssl_context
from tiktrue.security.node_tls import NetworkCredentials, node_identity

pytestmark = pytest.mark.integration
NET = "testnet"
PROMPTS = [[5, 17, 42, 99], [7, 250, 31], [64, 12, 3, 77, 8], [100, 101]]


def reference_tokens(store, prompt: list[int], max_tokens: int) -> list[int]:
    """Greedy tokens of the one-process engine for ``prompt``."""
    chain = LocalChain(
        [BlockEngine(store, s) for s in split_evenly(store.manifest.model_chain_order, 2)]
    )
    chain.open("ref")
    result = GenerationResult()

    async def go():
        params = SamplingParams(temperature=0, max_tokens=max_tokens)
        stream = stream_tokens(
            chain,
            prompt,
            params,
            tokenizer=load_tokenizer(store),
            stop_ids=set(),
            session_id="ref",
            result=result,
        )
        async for _ in stream:
            pass

    asyncio.run(go())
    return result.token_ids


def run(coro):
    return asyncio.run(coro)


def greedy(ids: list[int], n: int, **extra) -> dict:
    return request(NET, input_ids=ids, temperature=0, max_tokens=n, **extra)


def test_three_nodes_match_the_one_process_engine(tiny_cluster, tiny_llama):
    cluster, _, _ = tiny_cluster

    async def go():
        async with websockets.connect(client_ws_url(cluster)) as ws:
            return await ask(ws, greedy(PROMPTS[0], 16))

    replies = run(go())
    assert replies[-1]["status"] == "success" and replies[-1]["finish_reason"] == "length"
    assert token_ids(replies) == reference_tokens(tiny_llama, PROMPTS[0], 16)


def test_four_concurrent_sessions_are_each_correct_and_batched(tiny_cluster, tiny_llama):
    """Four answers at once: each equals the same answer alone, and every node ran their
    decode steps in batches (one forward for several sessions)."""
    cluster, homes, _ = tiny_cluster

    async def one(i: int):
        async with websockets.connect(client_ws_url(cluster)) as ws:
            return await ask(ws, greedy(PROMPTS[i], 24, message_id=f"c{i}"))

    async def go():
        before = await network_infos(homes, NET)
        answers = await asyncio.gather(*(one(i) for i in range(4)))
        after = await network_infos(homes, NET)
        return answers, [
            a["steps"]["batched_steps"] - b["steps"]["batched_steps"]
            for a, b in zip(after, before, strict=True)
        ]

    answers, batched = run(go())
    for i, replies in enumerate(answers):
        assert token_ids(replies) == reference_tokens(tiny_llama, PROMPTS[i], 24), i
    assert all(n > 0 for n in batched), batched


def test_legacy_and_protocol_messages_are_each_answered(tiny_cluster, tiny_llama):
    cluster, _, _ = tiny_cluster
    legacy = {"session_id": "legacy-1", "step": 0, "input_tensors": {"input_ids": [5, 17, 42]}}
    seed000 = {
        "network_id": NET,
        "session_id": "s000",
        "payload": {"input_ids": [5, 17], "max_length": 4, "temperature": 0},
    }
    seeded = request(NET, prompt="Hello", max_tokens=5, seed=1)

    async def go():
        async with websockets.connect(client_ws_url(cluster)) as ws:
            a = await ask(ws, legacy)
            b = await ask(ws, seeded)
            c = await ask(ws, seed000)
            again = await ask(ws, {**seeded, "header": {**seeded["header"], "message_id": "m-2"}})
            return a, b, c, again

    legacy_replies, protocol_replies, seed_replies, again = run(go())
    assert (
        legacy_replies[-1]["status"] == "success" and legacy_replies[-1]["session_id"] == "legacy-1"
    )
    assert token_ids(legacy_replies)
    assert protocol_replies[-1]["status"] == "success"
    assert protocol_replies[-1]["in_reply_to"] == "m-1"
    # 5 tokens unless the model chose to stop; the same seed gives the same answer
    assert _as_many_as_asked(protocol_replies, 5) == token_ids(again)
    assert seed_replies[-1]["status"] == "success"
    assert _as_many_as_asked(seed_replies, 4) == reference_tokens(tiny_llama, [5, 17], 4)


def _as_many_as_asked(replies: list[dict], max_tokens: int) -> list[int]:
    """The tokens of a finished answer, checked against its finish reason and usage."""
    final, got = replies[-1], token_ids(replies)
    assert final["usage"]["completion_tokens"] == len(got), final
    if final["finish_reason"] == "length":
        assert len(got) == max_tokens, final
    else:
        assert final["finish_reason"] == "stop" and len(got) < max_tokens, final
    return got


def test_client_errors_are_structured_and_the_connection_survives(tiny_cluster):
    cluster, _, _ = tiny_cluster

    async def go():
        async with websockets.connect(client_ws_url(cluster)) as ws:
            wrong = await ask(ws, request("othernet", prompt="hi", message_id="w-1"))
            malformed = await ask(ws, "{not json")
            unknown = await ask(ws, request(NET, message_type="teleport", message_id="u-1"))
            after = await ask(ws, greedy(PROMPTS[1], 3))
            return wrong, malformed, unknown, after

    wrong, malformed, unknown, after = run(go())
    assert wrong[0]["code"] == "wrong_network" and wrong[0]["in_reply_to"] == "w-1"
    assert malformed[0]["code"] == "malformed_json"
    assert unknown[0]["code"] == "unknown_message_type" and unknown[0]["in_reply_to"] == "u-1"
    assert after[-1]["status"] == "success"


def member_credentials(homes) -> NetworkCredentials:
    return NetworkCredentials.load(homes[0], NET)


def hello(credentials, **overrides) -> ps.Hello:
    fields = {"node_id": credentials.identity.node_id, "network_id": NET, **overrides}
    return ps.Hello(**fields)


def test_bad_frames_get_structured_errors_while_other_sessions_go_on(tiny_cluster):
    cluster, homes, config = tiny_cluster
    credentials = member_credentials(homes)
    middle = config.chain()[1].address

    async def go():
        ws = await node_connection(middle, credentials, hello(credentials))
        replies = {}

        # oversized: larger than the largest legitimate request of this model
        def step(tensor, message_id, network_id=NET):
            return encode_tensor_frame(
                tensor,
                kind="forward",
                network_id=network_id,
                session_id="x",
                message_id=message_id,
                start=0,
            )

        # larger than the largest legitimate request of this model; a wrong hidden size;
        # another network
        for name, frame in (
            ("big", step(torch.zeros(1, 9000, 64), "big")),
            ("shape", step(torch.zeros(1, 2, 65), "shape")),
            ("net", step(torch.zeros(1, 2, 64), "net", network_id="othernet")),
        ):
            await ws.send(frame)
            replies[name] = json.loads(await ws.recv())
        await ws.send(b"\x00\x00\x00\x05{bad}")
        replies["garbage"] = json.loads(await ws.recv())
        await ws.send("{oops")
        replies["json"] = json.loads(await ws.recv())
        heartbeat = ps.Heartbeat(node_id=credentials.identity.node_id, network_id=NET)
        await ws.send(ps.make_message(heartbeat))
        replies["alive"] = json.loads(await ws.recv())
        await ws.close()
        async with websockets.connect(client_ws_url(cluster)) as client:
            replies["session"] = await ask(client, greedy(PROMPTS[2], 4))
        return replies

    replies = run(go())
    assert replies["big"]["code"] == "frame_too_large" and replies["big"]["in_reply_to"] == "big"
    assert replies["shape"]["code"] == "bad_shape" and replies["shape"]["in_reply_to"] == "shape"
    assert replies["net"]["code"] == "wrong_network" and replies["net"]["in_reply_to"] == "net"
    assert replies["garbage"]["code"] == "bad_tensor"
    assert replies["json"]["code"] == "malformed_json"
    assert replies["alive"]["header"]["message_type"] == "heartbeat"
    assert replies["session"][-1]["status"] == "success"


def test_a_client_without_a_network_certificate_cannot_connect(tiny_cluster, tmp_path):
    _, homes, config = tiny_cluster
    ca_cert = homes[0] / "networks" / NET / "ca_cert.pem"
    address = config.chain()[1].address
    no_cert = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    no_cert.load_verify_locations(ca_cert)
    stranger = node_identity(tmp_path / "stranger")
    other_ca = create_network_ca(NET, tmp_path / "other-ca")  # same name, another CA
    cert = other_ca.generate_node_certificate(stranger.node_id, stranger.public_key, "worker")
    (tmp_path / "cert.pem").write_bytes(cert)
    foreign = client_ssl_context(tmp_path / "cert.pem", stranger.key_path, ca_cert)

    async def attempt(context):
        ws = await websockets.connect(f"wss://{address}", ssl=context, open_timeout=60)
        await ws.send(ps.make_message(ps.Hello(node_id=stranger.node_id, network_id=NET)))
        return await ws.recv()

    async def member():  # the node is there and takes members
        credentials = member_credentials(homes)
        ws = await node_connection(address, credentials, hello(credentials))
        await ws.close()

    run(member())
    for context in (no_cert, foreign):
        # TLS 1.3: the client's side of the handshake ends before the server checks its
        # certificate, so the refusal shows as the server's alert, or the connection closed
        # (or reset) before the HTTP upgrade's answer; never a timeout or "nobody listens"
        with pytest.raises(
            (ssl.SSLError, websockets.InvalidMessage, ConnectionResetError)
        ) as refused:
            run(attempt(context))
        if isinstance(refused.value, websockets.InvalidMessage):
            assert isinstance(refused.value.__cause__, EOFError), refused.value.__cause__
        if isinstance(refused.value, ssl.SSLError):
            assert "ALERT" in (refused.value.reason or ""), refused.value


def test_a_version_mismatch_is_refused_with_both_versions(tiny_cluster):
    _, homes, config = tiny_cluster
    credentials = member_credentials(homes)

    async def go():
        ws = await websockets.connect(
            f"wss://{config.chain()[2].address}", ssl=credentials.client_context()
        )
        await ws.send(ps.make_message(hello(credentials, software_version="9.1.0")))
        reply = json.loads(await ws.recv())
        with pytest.raises(websockets.ConnectionClosed):
            await ws.recv()
        return reply

    reply = run(go())
    assert reply["code"] == "version_mismatch"
    assert "9.1.0" in reply["message"] and ps.SOFTWARE_VERSION in reply["message"]


def test_a_saved_and_restored_session_continues_identically(tiny_cluster):
    cluster, _, _ = tiny_cluster

    def session_msg(kind: str, sid: str) -> dict:
        return request(NET, message_type=kind, session_id=sid, message_id=f"{kind}-{sid}")

    async def conversation(ws, sid: str, save: bool):
        first = await ask(ws, greedy(PROMPTS[3], 6, session_id=sid))
        if save:
            assert (await ask(ws, session_msg("session_save", sid)))[0]["detail"].startswith(
                "saved"
            )
            assert (await ask(ws, session_msg("session_close", sid)))[0]["detail"] == "closed"
            restored = await ask(ws, session_msg("session_restore", sid))
            assert restored[0]["detail"] == "restored", restored
        second = await ask(ws, greedy([9, 10], 6, session_id=sid))
        return token_ids(first), token_ids(second)

    async def go():
        async with websockets.connect(client_ws_url(cluster)) as ws:
            kept = await conversation(ws, "kept", save=False)
            saved = await conversation(ws, "saved", save=True)
            missing = await ask(ws, session_msg("session_restore", "never-saved"))
            return kept, saved, missing

    kept, saved, missing = run(go())
    assert saved == kept and len(kept[1]) == 6
    assert missing[0]["code"] == "session_not_found"


def test_the_head_answers_the_first_node_directly(tiny_cluster):
    """Steps go node to node and the head's answer goes straight back to the first node (the
    gateway's), not back through the chain; the usage shows the links a step used."""
    cluster, _, _ = tiny_cluster

    usage = run(direct_answer_usage(client_ws_url(cluster), NET, PROMPTS[0]))
    assert usage["hops"] == 3  # node1 -> node2 -> node3 -> node1; the gateway is in node1
    entry, *links = usage["link_rtt_ms"]
    assert entry == 0.0 and len(links) == 3
    assert all(isinstance(rtt, float) and rtt > 0 for rtt in links), links  # head -> node1 too
    assert usage["transit_ms"] > 0
    assert len(usage["node_compute_ms"]) == 3


def test_a_first_step_opens_its_session_on_every_node(tiny_cluster, tiny_llama):
    """The gateway opens a session with its first step (one chain round trip less before the
    first token); opening again starts the session afresh."""
    _, homes, config = tiny_cluster
    credentials = member_credentials(homes)
    prompt = PROMPTS[1]

    def step(message_id: str, ids: list[int], start: int, **extra) -> bytes:
        return encode_tensor_frame(
            torch.tensor(ids),
            kind="forward",
            network_id=NET,
            session_id="opened-by-step",
            message_id=message_id,
            start=start,
            tokens=ids,
            **extra,
        )

    async def go():
        first = config.chain()[0].address
        ws = await node_connection(first, credentials, hello(credentials))
        replies = []
        for message_id, frame in (
            ("a", step("a", prompt, 0, open=True)),  # never opened before
            ("b", step("b", prompt, 0, open=True)),  # again: afresh, the same token
            ("c", step("c", prompt, 0)),  # without open: the session holds positions already
        ):
            await ws.send(frame)
            replies.append(json.loads(await ws.recv()))
            assert replies[-1]["in_reply_to"] == message_id
        await ws.close()
        return replies

    a, b, c = run(go())
    expected = reference_tokens(tiny_llama, prompt, 1)[0]
    assert a["token_id"] == b["token_id"] == expected
    assert c["header"]["message_type"] == "error" and c["code"] == "bad_positions", c


def test_a_prompt_in_chunks_equals_the_prompt_at_once(tiny_cluster, tiny_llama):
    """The gateway's chain client sends a long prompt in chunks (here of 7 tokens); the
    answer equals the one-process engine's, the nodes ran one prompt step per chunk, and the
    head's sampling history (repetition penalty) holds every chunk's tokens."""
    from tiktrue.gateway.chain_client import ChainClient

    _, homes, config = tiny_cluster
    prompt = [(i * 37) % 300 + 3 for i in range(60)]

    async def go():
        chain = ChainClient(config, member_credentials(homes), prefill_chunk=7)
        try:
            before = await network_infos(homes, NET)
            await chain.open("chunked")
            tokens = [await chain.step("chunked", prompt, 0, SamplingParams(temperature=0))]
            for i in range(5):
                tokens.append(await chain.step("chunked", tokens[-1:], len(prompt) + i))
            after = await network_infos(homes, NET)
            await chain.control(ps.SessionSave, "chunked")
            await chain.close("chunked")
        finally:
            await chain.aclose()
        rounds = [
            a["steps"]["rounds"] - b["steps"]["rounds"] for a, b in zip(after, before, strict=True)
        ]
        return tokens, rounds

    tokens, rounds = run(go())
    assert tokens == reference_tokens(tiny_llama, prompt, 6)
    assert all(n >= 60 // 7 + 1 for n in rounds), rounds  # 9 chunks, then 5 decode steps
    history = homes[-1] / "sessions" / NET / "chunked" / "history.json"
    assert json.loads(history.read_text()) == prompt + tokens[:5]


def test_a_stranger_flooding_a_block_port_is_closed_before_tls(tiny_cluster, tiny_llama):
    """A source holding its cap of connections open on a node's block port (no TLS started:
    it costs no handshake) has its next one closed at once; the chain answers meanwhile, and
    as it did before (security.connection_limits, also on the block servers)."""
    from tiktrue import limits

    cluster, _, config = tiny_cluster
    port = config.chain()[1].port

    async def go():
        held = [
            await asyncio.open_connection("127.0.0.1", port, local_addr=("127.0.0.2", 0))
            for _ in range(limits.MAX_CONNECTIONS_PER_SOURCE)
        ]
        try:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, local_addr=("127.0.0.2", 0)
            )
            try:  # its TLS hello gets no answer: it was closed at accept
                writer.write(_client_hello())
                await writer.drain()
                closed = await asyncio.wait_for(reader.read(1), 60)
            except ConnectionResetError:
                closed = b""
            writer.close()
            async with websockets.connect(client_ws_url(cluster)) as ws:
                replies = await ask(ws, greedy(PROMPTS[1], 8))
        finally:
            for _, w in held:
                w.close()
        return closed, replies

    closed, replies = run(go())
    assert closed == b"", "the server answered the flood's TLS hello"
    assert token_ids(replies) == reference_tokens(tiny_llama, PROMPTS[1], 8)


def _client_hello() -> bytes:
    """The first bytes of a TLS handshake (a server that takes the connection answers them)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    with contextlib.suppress(ssl.SSLWantReadError):
        context.wrap_bio(incoming, outgoing).do_handshake()
    return outgoing.read()
